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

import contextlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from device_agent.core.fsutil import (
    FileTooLarge,
    NotRegularFile,
    atomic_write,
    open_regular,
    read_regular,
)
from device_agent.core.record import LEAD_ORDER, DeviceInfo, Record

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
MAX_FS = 1e6  # Hz; a header claiming more is not an ECG
# What a read may cost, whatever a header claims: the unit runs under MemoryMax=300M and a
# sample costs ~24 bytes on its way to float64 uV. 4 M samples is 11 min of 12 leads at 500 Hz.
MAX_SAMPLES = 4_000_000
MAX_HEADER_BYTES = 1 << 20
MAX_SIGNALS = 1024
_INT64 = 1 << 63
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
    fmt = int(match["fmt"]) if len(match["fmt"]) < 6 else 0
    if fmt not in FORMATS:
        raise ValueError(f"{hea}: signal {index} is WFDB format {match['fmt'][:20]}; formats "
                         f"{', '.join(map(str, sorted(FORMATS)))} are read")
    spf = _whole(hea, match["spf"] or "1", f"signal {index} samples per frame", 1, MAX_SAMPLES)
    skew = _whole(hea, match["skew"] or "0", f"signal {index} skew", 0, MAX_SAMPLES)
    offset = _whole(hea, match["offset"] or "0", f"signal {index} byte offset", 0, _INT64 - 1)
    gain, baseline_text, units = 200.0, None, "mV"
    if len(fields) > 2:
        g = _GAIN_RE.match(fields[2])
        gain = _number(hea, g["gain"], f"signal {index} gain") if g else math.nan
        if not g or not math.isfinite(gain):
            raise ValueError(f"{hea}: cannot read signal {index} gain field {fields[2]!r} "
                             "(gain[(baseline)][/units], a finite gain); fix the header")
        gain = gain or 200.0
        baseline_text, units = g["baseline"], g["units"] or "mV"
    adc_zero = (_whole(hea, fields[4], f"signal {index} ADC zero", -_INT64, _INT64 - 1)
                if len(fields) > 4 else 0)
    baseline = (_whole(hea, baseline_text, f"signal {index} baseline", -_INT64, _INT64 - 1)
                if baseline_text is not None else adc_zero)
    description = " ".join(fields[8:]) if len(fields) > 8 else f"signal {index}"
    name = fields[0]
    if "/" in name or name in (".", ".."):
        raise ValueError(f"{hea}: signal {index} data file {name!r} is not a file name in the "
                         "header's folder; keep the .dat beside the .hea and name it alone")
    return SignalSpec(name, fmt, spf, skew, offset, gain, baseline, units, adc_zero,
                      description)


def _whole(hea: Path, text: str, what: str, low: int, high: int) -> int:
    """A header field as a whole number in low..high; else a one-line error naming it."""
    if not re.fullmatch(r"[-+]?\d{1,20}", text):
        raise ValueError(f"{hea}: {what} {text[:40]!r} is not a whole number; fix the header")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{hea}: {what} {value} is outside {low}..{high}; fix the header")
    return value


def _number(hea: Path, text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{hea}: {what} {text[:40]!r} is not a number; fix the header"
                         ) from None


def _read_header(hea: Path) -> list[str]:
    """The header's lines: a bounded regular file of UTF-8 text without NULs."""
    try:
        raw = read_regular(hea, max_bytes=MAX_HEADER_BYTES)
    except FileTooLarge:
        raise ValueError(f"{hea}: over {MAX_HEADER_BYTES} bytes, not a WFDB header; pass the "
                         ".hea of the record") from None
    except NotRegularFile as exc:
        raise ValueError(f"{hea}: {exc.strerror}; pass the .hea file itself") from None
    if b"\0" in raw:
        raise ValueError(f"{hea}: holds NUL bytes, not a WFDB header; pass the .hea text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{hea}: byte {exc.start} is not UTF-8 text, not a WFDB header; "
                         "re-save it as UTF-8 (or ASCII)") from None
    return text.splitlines()


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
    lines = _read_header(hea)
    comments = tuple(line.lstrip("# ").strip() for line in lines if line.startswith("#"))
    body = [line.split() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not body or len(body[0]) < 2:
        raise ValueError(f"{hea}: no record line (name and number of signals); pass the .hea "
                         "of a WFDB record")
    head = body[0]
    if re.fullmatch(r"[^/]+/\d+", head[0]):
        raise ValueError(f"{hea}: a multi-segment record ({head[0]}); read its segments")
    if not _NAME_RE.match(head[0]):
        raise ValueError(f"{hea}: record name {head[0][:40]!r} is not a WFDB record name "
                         "(letters, digits, _ . -); fix the header")
    name = head[0]
    n_sig = _whole(hea, head[1], "number of signals", 1, MAX_SIGNALS)
    fs = DEFAULT_FS
    if len(head) > 2:
        freq = _FREQ_RE.match(head[2])
        fs = _number(hea, freq["fs"], "sampling frequency") if freq else math.nan
        if not 0 < fs <= MAX_FS:  # NaN fails too
            raise ValueError(f"{hea}: cannot read the sampling frequency {head[2][:40]!r} "
                             f"(Hz above 0, at most {MAX_FS:g}); fix the header")
    declared = _whole(hea, head[3], "number of samples", 0, _INT64 - 1) if len(head) > 3 else 0
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
    present = {f: idx for f, idx in files.items() if os.path.lexists(hea.with_name(f))}
    if not present:
        raise FileNotFoundError(f"{hea}: none of its data files {sorted(files)} exist")
    kept = sorted(i for idx in present.values() for i in idx)
    spfs = {specs[i].samples_per_frame for i in kept}
    expand = spfs.pop() if len(spfs) == 1 else 1  # every signal k per frame: k x the rate
    # What each file holds, from its size alone: nothing is read before the cost is known.
    held = {f: _frames_held(hea, f, [specs[i] for i in idx]) for f, idx in present.items()}
    if declared:
        n_frames = declared
        for filename, frames_held in held.items():
            if frames_held < n_frames:
                raise ValueError(f"{hea.with_name(filename)}: holds {frames_held} of the "
                                 f"{n_frames} frames {hea.name} declares: truncated; fetch "
                                 "the record again")
    else:  # 0: unknown, read from the files
        n_frames = max(0, min(held[f] - specs[i].skew for f, idx in present.items()
                              for i in idx))
    if n_frames == 0:
        raise ValueError(f"{hea}: its data files hold no complete frame; fetch the record "
                         "again")
    total = len(kept) * n_frames * expand
    if total > MAX_SAMPLES:
        raise ValueError(f"{hea}: {total} samples, over the limit of {MAX_SAMPLES}; cut the "
                         "record shorter (e.g. wfdb's snip) before reading it here")
    decoded: dict[int, np.ndarray] = {}
    for filename, indices in present.items():
        first = specs[indices[0]]  # header(5): the first signal's offset is the file's
        frame = sum(specs[i].samples_per_frame for i in indices)
        want = min(held[filename], n_frames + max(specs[i].skew for i in indices))
        size, per_group, _ = FORMATS[first.fmt]
        if want * frame > MAX_SAMPLES:
            raise ValueError(f"{hea.with_name(filename)}: {want * frame} samples to read, "
                             f"over the limit of {MAX_SAMPLES}; cut the record shorter")
        nbytes = -(-want * frame // per_group) * size
        raw = _read_span(hea, filename, first.byte_offset, nbytes)
        flat = _decode(raw, first.fmt)
        frames = flat[: flat.size - flat.size % frame].reshape(-1, frame)
        column = 0
        for index in indices:
            k = specs[index].samples_per_frame
            samples = frames[:, column : column + k]  # (frames, k)
            column += k
            decoded[index] = samples
    signals = np.full((len(kept), n_frames * expand), np.nan)
    for row, index in enumerate(kept):
        spec, samples = specs[index], decoded[index]
        invalid = FORMATS[spec.fmt][2]
        take = samples[spec.skew : spec.skew + n_frames].astype(np.float64)
        take[samples[spec.skew : spec.skew + n_frames] == invalid] = np.nan
        values = take.ravel() if expand > 1 else take.mean(axis=1)
        physical = (values - float(spec.baseline)) / spec.gain * spec.to_uv
        signals[row, : physical.size] = physical  # frames past the file's end stay NaN
    if np.isinf(signals).any():
        raise ValueError(f"{hea}: its gains and baselines make samples infinite; fix the "
                         "header's gain fields")
    names = [specs[i].description for i in kept]
    return WfdbRecord(name, fs * expand, tuple(names), signals, comments)


def _frames_held(hea: Path, filename: str, specs: list[SignalSpec]) -> int:
    """Whole frames a data file holds past its byte offset, from its size (nothing read)."""
    dat = hea.with_name(filename)
    size, per_group, _ = FORMATS[specs[0].fmt]
    with _open_data(hea, filename) as (_, st):
        offset = specs[0].byte_offset
        if offset > st.st_size:
            raise ValueError(f"{dat}: byte offset {offset} is past its end ({st.st_size} "
                             f"bytes); check the format field in {hea.name}")
        samples = (st.st_size - offset) // size * per_group
    return samples // sum(spec.samples_per_frame for spec in specs)


@contextlib.contextmanager
def _open_data(hea: Path, filename: str) -> Iterator[tuple[int, os.stat_result]]:
    dat = hea.with_name(filename)
    try:
        with open_regular(dat, max_bytes=_INT64) as opened:
            yield opened
    except NotRegularFile as exc:
        raise ValueError(f"{dat}: {exc.strerror}; keep the record's data file a regular file "
                         f"beside {hea.name}") from None
    except OSError as exc:
        raise ValueError(f"{dat}: cannot open it ({exc.strerror}); check it and its "
                         "permissions") from None


def _read_span(hea: Path, filename: str, offset: int, nbytes: int) -> bytes:
    """At most nbytes of a data file from offset (a file that shrank gives fewer)."""
    chunks = []
    with _open_data(hea, filename) as (fd, _):
        while nbytes > 0:
            chunk = os.pread(fd, min(nbytes, 1 << 20), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            nbytes -= len(chunk)
    return b"".join(chunks)


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
    where = src.name if isinstance(source, WfdbRecord) else str(_header_path(source))
    have = {lead.lower() for lead in src.lead_names}
    lacking = [lead for lead in LEAD_ORDER if lead.lower() not in have]
    if lacking:
        raise ValueError(f"{where}: lacks leads {', '.join(lacking)} of the 12 standard ones "
                         f"(it has {', '.join(src.lead_names)[:200]}); pass a 12-lead record")
    fs = int(src.sampling_rate)
    if fs < 1:
        raise ValueError(f"{where}: sampling frequency {src.sampling_rate:g} Hz is under 1 Hz; "
                         "pass a 12-lead ECG record")
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
