"""Read and write WFDB records with numpy alone: the simulator's and the tests' source, an
input `measure` accepts, and an export format for research tools.

The reader follows header(5) (see read_record: formats 16, 61, 80, 160, 212, 24, 32,
samples per frame, skew, byte offset); the writer writes format 16. A sample stored as the
format's invalid value (-32768 in format 16) reads as NaN, and a Record built from it
marks the sample lost. The writer stores a Record exactly: 1 ADC unit per uV
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


# Signal-specification format field (header(5)): format[xsamples_per_frame][:skew][+offset]
_FORMAT_RE = re.compile(
    r"^(?P<fmt>\d+)(?:x(?P<spf>\d+))?(?::(?P<skew>\d+))?(?:\+(?P<offset>\d+))?$")
# Record line's frequency field: frequency[/counter_frequency[(base_counter)]]
_FREQ_RE = re.compile(r"^(?P<fs>[0-9.eE+-]+)(?:/[0-9.eE+-]+(?:\([-0-9.eE+]+\))?)?$")
DEFAULT_FS = 250.0  # header(5): the sampling frequency when the record line gives none
# format -> (bytes per group, samples per group, the invalid-sample value)
FORMATS = {16: (2, 1, -32768), 61: (2, 1, -32768), 80: (1, 1, -128), 160: (2, 1, -32768),
           212: (3, 2, -2048), 24: (3, 1, -(1 << 23)), 32: (4, 1, -(1 << 31))}


@dataclass(frozen=True)
class SignalSpec:
    """One signal-specification line of a header, as header(5) defines it."""

    file_name: str
    fmt: int
    samples_per_frame: int
    skew: int
    byte_offset: int
    gain: float  # ADC units per physical unit (0 in the file: 200, the default)
    baseline: int
    units: str
    adc_zero: int
    description: str

    @property
    def to_uv(self) -> float:
        """Microvolts per physical unit."""
        return {"mv": 1000.0, "uv": 1.0, "v": 1e6}.get(self.units.lower(), 1000.0)


def parse_signal_spec(hea: Path, index: int, fields: list[str]) -> SignalSpec:
    """A signal-specification line's fields; a one-line error naming what is wrong."""
    if len(fields) < 2:
        raise ValueError(f"{hea}: signal {index} has no format field")
    match = _FORMAT_RE.match(fields[1])
    if not match:
        raise ValueError(f"{hea}: signal {index} format field {fields[1]!r} is not "
                         "format[xsamples][:skew][+offset]")
    fmt = int(match["fmt"])
    if fmt not in FORMATS:
        raise ValueError(f"{hea}: signal {index} is WFDB format {fmt}; formats "
                         f"{', '.join(map(str, sorted(FORMATS)))} are read")
    spf = int(match["spf"] or 1)
    if spf < 1:
        raise ValueError(f"{hea}: signal {index} has {spf} samples per frame")
    gain, baseline_text, units = 200.0, None, "mV"
    if len(fields) > 2:
        g = _GAIN_RE.match(fields[2])
        if not g:
            raise ValueError(f"{hea}: cannot read gain field {fields[2]!r}")
        gain = float(g["gain"]) or 200.0
        baseline_text, units = g["baseline"], g["units"] or "mV"
    adc_zero = int(fields[4]) if len(fields) > 4 else 0
    baseline = int(baseline_text) if baseline_text is not None else adc_zero
    description = " ".join(fields[8:]) if len(fields) > 8 else f"signal {index}"
    return SignalSpec(fields[0], fmt, spf, int(match["skew"] or 0),
                      int(match["offset"] or 0), gain, baseline, units, adc_zero, description)


def _decode(raw: bytes, fmt: int) -> np.ndarray:
    """A data file's bytes as its samples in file order (int64), per the format."""
    size = FORMATS[fmt][0]
    usable = len(raw) - len(raw) % size
    b = np.frombuffer(raw[:usable], dtype=np.uint8)
    if fmt == 16:
        return np.frombuffer(raw[:usable], dtype="<i2").astype(np.int64)
    if fmt == 61:
        return np.frombuffer(raw[:usable], dtype=">i2").astype(np.int64)
    if fmt == 80:
        return b.astype(np.int64) - 128
    if fmt == 160:
        return np.frombuffer(raw[:usable], dtype="<u2").astype(np.int64) - 32768
    if fmt == 32:
        return np.frombuffer(raw[:usable], dtype="<i4").astype(np.int64)
    g = b.reshape(-1, size).astype(np.int64)
    if fmt == 24:
        v = g[:, 0] | (g[:, 1] << 8) | (g[:, 2] << 16)
        return np.where(v >= 1 << 23, v - (1 << 24), v)
    # 212: two 12-bit samples in three bytes; the second byte's low nibble is the first
    # sample's high bits, its high nibble the second's
    first = g[:, 0] | ((g[:, 1] & 0x0F) << 8)
    second = g[:, 2] | ((g[:, 1] & 0xF0) << 4)
    out = np.stack([first, second], axis=1).ravel()
    return np.where(out >= 2048, out - 4096, out)


def read_record(path: Path | str) -> WfdbRecord:
    """Read a record by its `.hea` path or stem (`.../HR06000`).

    The header is read as header(5) defines it: the record line's frequency (counter
    frequency and base counter ignored; 250 Hz when absent) and sample count (from the data
    file when absent or 0), and per signal the format field `format[xspf][:skew][+offset]`:
    formats 16, 61, 80, 160, 212, 24 and 32; samples per frame (a signal with k samples in
    each frame is read at k times the frame rate when every signal has k, else averaged over
    each frame as wfdb-python's smooth_frames does); skew (the signal's sample i is frame
    i + skew; frames past the end are invalid); the byte offset (bytes before the first
    sample, e.g. the .mat prologue of the PhysioNet/CinC 2021 files: `16+24`). Multi-segment
    records are refused. The format's invalid value reads as NaN.
    """
    hea = _header_path(path)
    lines = hea.read_text(encoding="utf-8").splitlines()
    comments = tuple(line.lstrip("# ").strip() for line in lines if line.startswith("#"))
    body = [line.split() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not body or len(body[0]) < 2:
        raise ValueError(f"{hea}: no record line (name and number of signals)")
    head = body[0]
    if "/" in head[0]:
        raise ValueError(f"{hea}: a multi-segment record ({head[0]}); read its segments")
    name, n_sig = head[0], int(head[1])
    fs = DEFAULT_FS
    if len(head) > 2:
        freq = _FREQ_RE.match(head[2])
        if not freq:
            raise ValueError(f"{hea}: cannot read the sampling frequency {head[2]!r}")
        fs = float(freq["fs"])
    n_frames = int(head[3]) if len(head) > 3 and int(head[3]) > 0 else None  # 0: unknown
    if len(body) < 1 + n_sig:
        raise ValueError(f"{hea}: {n_sig} signals declared, {len(body) - 1} specified")
    specs = [parse_signal_spec(hea, i, fields) for i, fields in enumerate(body[1 : 1 + n_sig])]

    files: dict[str, list[int]] = {}
    for index, spec in enumerate(specs):
        files.setdefault(spec.file_name, []).append(index)
    for filename, indices in files.items():
        if len({specs[i].fmt for i in indices}) > 1:
            raise ValueError(f"{hea}: signals in {filename} differ in format")

    # Signals whose data file is absent (s0010_re ships without its Frank-lead .xyz) are
    # left out; the 12 standard leads are all the board and the tests use.
    present = {f: idx for f, idx in files.items() if hea.with_name(f).exists()}
    if not present:
        raise FileNotFoundError(f"{hea}: none of its data files {sorted(files)} exist")
    kept = sorted(i for idx in present.values() for i in idx)
    spfs = {specs[i].samples_per_frame for i in kept}
    expand = spfs.pop() if len(spfs) == 1 else 1  # every signal k per frame: k x the rate
    decoded: dict[int, np.ndarray] = {}
    for filename, indices in present.items():
        first = specs[indices[0]]  # header(5): the first signal's offset is the file's
        raw = hea.with_name(filename).read_bytes()[first.byte_offset :]
        flat = _decode(raw, first.fmt)
        frame = sum(specs[i].samples_per_frame for i in indices)
        frames = flat[: flat.size - flat.size % frame].reshape(-1, frame)
        column = 0
        for index in indices:
            k = specs[index].samples_per_frame
            samples = frames[:, column : column + k]  # (frames, k)
            column += k
            decoded[index] = samples
    available = min(d.shape[0] - specs[i].skew for i, d in decoded.items())
    if n_frames is None:
        n_frames = max(0, available)
    signals = np.full((len(kept), n_frames * expand), np.nan)
    for row, index in enumerate(kept):
        spec, samples = specs[index], decoded[index]
        invalid = FORMATS[spec.fmt][2]
        take = samples[spec.skew : spec.skew + n_frames].astype(np.float64)
        take[samples[spec.skew : spec.skew + n_frames] == invalid] = np.nan
        values = take.ravel() if expand > 1 else take.mean(axis=1)
        physical = (values - spec.baseline) / spec.gain * spec.to_uv
        signals[row, : physical.size] = physical  # frames past the file's end stay NaN
    names = [specs[i].description for i in kept]
    return WfdbRecord(name, fs * expand, tuple(names), signals, comments)


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
