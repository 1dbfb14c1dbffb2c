"""The `ecg_data_{stamp}.json` document: numpy-vectorised `dumps` and its inverse `loads`.

Document (canonical compact JSON, UTF-8, keys in this order; `loads(dumps(r)) == r`):

- `timestamp`: `"YYYY-MM-DD HH:MM:SS"`, the wall clock of `acquired_at` (legacy key).
- `sampling_rate`: int, Hz (legacy key).
- `leads`: `{name: [int uV, ...]}` in `lead_names` order, numbers only (legacy key). A lost
  sample holds the last received value of its lead before it (the first received one when
  the loss starts the lead; 0 in a lead with no received sample), so the legacy reader's
  `np.array(lead, dtype=float)` gets 12 finite leads and draws a flat line across a gap.
- `lost_samples`: `{name: [[first sample, count], ...]}`, the exact runs of lost samples of
  each lead that has any (`{}` when none): what `loads`, the PDF and the DICOM go by.
- `acquired_at`: ISO 8601 with UTC offset, microseconds when non-zero (`datetime.isoformat`).
- `duration_s` (float), `samples_per_lead` (int), `units` (`"uV"`).
- `lead_order`: the lead names again; `derived_leads`: those of them computed, not measured.
- `adc`: `{bits, baseline: [counts per measured lead], counts_per_mv, byte_order}` or `null`.
- `device`: `{serial, model, agent_version}`; `record_id`: UUID string or `null`.
- `quality`: `{frames_expected, frames_received, frames_lost, lost_fraction,
  gaps: [{start_sample, length, start_s}],
  electrodes_off: [{electrode, start_sample, length, start_s, end_s}],
  flat_leads, saturated_leads, mains_noise_uv (null if unknown), bad_frames, verdict, reasons}`.
- `measurements`: `record.measurements` as given (JSON types; NaN/inf become `null`).

Files written before `lost_samples` existed hold `null` for a lost sample; they load too.

Derived values (`duration_s`, `lost_fraction`, `start_s`, `end_s`, `derived_leads`) are
written for readers and ignored by `loads`. A non-finite float is never written (JSON has
no NaN): it becomes `null`.

Legacy files `{"timestamp", "sampling_rate", "leads"}` (no `units` key) load too: their
`timestamp` becomes a naive `acquired_at` (the legacy app stored no offset). Their leads are
taken as microvolts when every value is a JSON integer, and as millivolts (scaled by 1000
and rounded to the nearest microvolt) when any value in any lead is a JSON float, because
the legacy app wrote floats in mV. Leads of unequal length are padded with lost samples.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime
from functools import cache, lru_cache
from typing import Any

import numpy as np

from device_agent.core.record import (
    DERIVED_LEADS,
    AdcInfo,
    DeviceInfo,
    ElectrodeOff,
    Gap,
    Quality,
    Record,
)

log = logging.getLogger(__name__)

UNITS = "uV"
_TABLE_LO, _TABLE_HI = -32768, 32767  # int16: every value the board can produce
_WORD = 8  # bytes per table entry: len("-32768,") fits, so one entry is one uint64
_WIDE = 3 * _WORD  # bytes per sample outside int16: len("-9223372036854775808,") fits
_NULL_TEXT = "null"
_NUL = b"\0"
_CLOSE = ord("]")


_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_compact = _COMPACT.encode


@cache
def _words() -> np.ndarray:
    """uint64 word `"<v>,"` for every int16 v, NUL-padded to 8 bytes.

    Indexed with `take(samples, mode="wrap")`: entry v for v >= 0, entry 65536 + v for v < 0.
    JSON text never holds a raw NUL, so removing every NUL byte from a stream of these words
    (one C pass: bytes.translate) leaves compact JSON.
    """
    text = np.arange(1 << 16).astype(np.uint16).view(np.int16).astype("S6")
    return np.char.add(text, b",").astype(f"S{_WORD}").view(np.uint64)


_NULL_WORD = np.frombuffer(f"{_NULL_TEXT},".encode().ljust(_WORD, _NUL), dtype=np.uint64)[0]


def _wide_words(samples: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """(n_leads, 3 n) words for leads with values outside int16 (legal, not from the board).

    Each sample is its `"<v>,"` NUL-padded to 24 bytes, i.e. three words.
    """
    text = np.char.add(samples.astype("S20"), b",").astype(f"S{_WIDE}")
    text[missing] = f"{_NULL_TEXT},"
    return text.view(np.uint64).reshape(samples.shape[0], -1)


@lru_cache(maxsize=64)
def _plan(
    names: tuple[str, ...], widths: tuple[int, ...], m: int
) -> tuple[int, int, tuple[tuple[int, bytes], ...], tuple[tuple[int, int, int, int, int], ...]]:
    """Where each lead's opening (`{"I":[`, `,"II":[`, ...) and its m words of widths[i] go.

    Openings get the same NUL-padded room, so leads of equal width are evenly spaced and
    one strided copy writes a run of them. Returns (size, room, [(offset, opening)],
    [(first lead, end lead, offset, lead stride, width)]), offsets relative to the stream;
    lead i's words start `room` bytes after its opening's offset.
    """
    keys = [(("{" if i == 0 else ",") + _compact(n) + ":[").encode() for i, n in enumerate(names)]
    room = max(len(key) for key in keys)
    offsets: list[int] = np.cumsum([0] + [room + m * w for w in widths]).tolist()
    runs = []
    first = 0
    for i in range(1, len(widths) + 1):
        if i == len(widths) or widths[i] != widths[first]:
            w = widths[first]
            runs.append((first, i, offsets[first] + room, room + m * w, w))
            first = i
    openings = tuple(zip(offsets, keys, strict=False))
    return offsets[-1], room, openings, tuple(runs)


@cache
def _overlay_in_order() -> bool:
    """Whether numpy's strided copy writes front to back here (checked once, else width 8)."""
    words = np.arange(1, 2 * 4096 + 1, dtype=np.uint64).reshape(2, -1)  # bytes 0..1 set
    buf = bytearray(5 * words.size + 3 + _WORD)
    dst = np.ndarray(words.shape, dtype=np.uint64, buffer=buf, offset=3,
                     strides=(5 * words.shape[1], 5))
    np.copyto(dst, words)
    got = np.frombuffer(buf, dtype=np.uint8)[3 : 3 + 5 * words.size].reshape(-1, 5)
    return bool(np.array_equal(got, words.view(np.uint8).reshape(-1, _WORD)[:, :5]))


def _empty_leads(names: tuple[str, ...]) -> bytes:
    keys = [(("," if i else "{") + _compact(x) + ":[]") for i, x in enumerate(names)]
    return ("".join(keys) + "}" if keys else "{}").encode()


def _document(
    head: bytes, names: tuple[str, ...], samples: np.ndarray, missing: np.ndarray | None,
    tail: bytes,
) -> bytearray:
    """head + the `leads` object + tail, built from NUL-padded words, NULs removed in one pass.

    Each lead's words are written `width` bytes apart (in order, so each 8-byte word
    overwrites the previous one's NUL padding), `width` being the lead's longest value
    text plus its separator: typically 5 or 6 bytes, so the NUL pass reads far less than
    8 bytes a sample. Each lead's last `,` then becomes `]`. The lead widths come from
    Python ints (12 per record), not numpy calls: per call, fixed costs are what matter.
    `missing` None: no `null` to write (what `dumps` asks; a mask only re-reads old files).
    """
    n_leads, n = samples.shape
    if n_leads == 0 or n == 0:
        return bytearray(b"".join((head, _empty_leads(names), tail)))
    lo: list[int] = samples.min(axis=1).tolist()
    hi: list[int] = samples.max(axis=1).tolist()
    last: list[int] = samples[:, -1].tolist()
    nulls = missing is not None and bool(missing.any())
    lost: list[bool] = [False] * n_leads
    last_lost = lost
    if nulls:
        assert missing is not None
        lost = [bool(row.any()) for row in missing]
        last_lost = [bool(x) for x in missing[:, -1]]
    if min(lo) >= _TABLE_LO and max(hi) <= _TABLE_HI and _overlay_in_order():
        words = _words().take(samples, mode="wrap")
        if nulls:
            words[missing] = _NULL_WORD
        widths = tuple(
            max(len(str(a)), len(str(b)), len(_NULL_TEXT) if gone else 0) + 1
            for a, b, gone in zip(lo, hi, lost, strict=True)
        )
        slots = widths
    else:
        words = _wide_words(samples, np.zeros(samples.shape, bool) if missing is None else missing)
        widths, slots = (_WORD,) * n_leads, (_WIDE,) * n_leads
    size, room, keys, runs = _plan(names, widths, words.shape[1])
    start = len(head)
    buf = bytearray(start + size + max(_WORD, 1 + len(tail)))
    buf[:start] = head
    for first, stop, offset, stride, width in runs:
        dst = np.ndarray((stop - first, words.shape[1]), dtype=np.uint64, buffer=buf,
                         offset=start + offset, strides=(stride, width))
        np.copyto(dst, words[first:stop])
    for (offset, key), slot, v, gone in zip(keys, slots, last, last_lost, strict=True):
        # after the words: a lead's last word spills NULs into the next opening
        buf[start + offset : start + offset + len(key)] = key
        buf[start + offset + room + (n - 1) * slot + (
            len(_NULL_TEXT) if gone else len(str(v)))] = _CLOSE
    buf[start + size : start + size + 1 + len(tail)] = b"}" + tail
    return buf.translate(None, _NUL)


def _held(names: tuple[str, ...], samples: np.ndarray,
          missing: np.ndarray) -> tuple[np.ndarray, str]:
    """(the samples as `leads` holds them, the `lost_samples` text) for a lossy record.

    Each lost sample takes its lead's last received value; a loss at the start of a lead
    takes the first received one, a lead with none is 0. (A flat line across a gap, not a
    step to 0 a legacy viewer would draw as a spike.) Only lost positions are touched, once
    per distinct mask: most captures lose whole frames, every lead alike.
    """
    out = samples.copy()
    texts: dict[int, str] = {}
    left = np.flatnonzero(missing.any(axis=1))
    while left.size:
        mask = missing[left[0]]
        same = (missing[left] == mask).all(axis=1)
        rows, left = left[same], left[~same]
        edges = np.flatnonzero(mask[1:] != mask[:-1]) + 1
        if mask[0]:
            edges = np.concatenate(([0], edges))
        if mask[-1]:
            edges = np.concatenate((edges, [mask.size]))
        first, end = edges[::2], edges[1::2]
        texts.update(dict.fromkeys(rows.tolist(), ",".join(
            map("[{},{}]".format, first.tolist(), (end - first).tolist()))))
        if first[0] == 0 and end[0] == mask.size:
            out[rows] = 0
            continue
        source = np.repeat(np.where(first > 0, first - 1, end), end - first)  # received
        lost = np.flatnonzero(mask)
        if rows.size == out.shape[0]:
            out[:, lost] = samples[:, source]
        elif rows.size == 1:
            out[rows[0], lost] = samples[rows[0], source]
        else:
            out[np.ix_(rows, lost)] = samples[np.ix_(rows, source)]
    lost_text = ",".join([f"{_compact(names[i])}:[{texts[i]}]" for i in sorted(texts)])
    return out, "{" + lost_text + "}"


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _jsonable(value: Any) -> Any:
    """Measurements made JSON-safe: numpy scalars/arrays unwrapped, NaN/inf as None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return _finite(value)
    return value


# The metadata is written with f-strings rather than by building dicts for json: its fields
# have fixed types, and the dicts and the generic encoder cost more per record than all the
# lead words. Each piece is exactly what `_COMPACT` writes for it: strings through the
# encoder's own `encode_basestring`, floats as `float.__repr__`, ints as `int.__repr__`.
_text = json.encoder.encode_basestring
_repr_float = float.__repr__
_isfinite = math.isfinite


def _reject(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# `_COMPACT.encode` builds this C encoder anew on every call; measurements reuse one.
_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_measurements_encoder = (
    None if _make_encoder is None
    else _make_encoder(None, _reject, _text, None, ":", ",", False, False, False)
)


def _num(value: float | None) -> str:
    """A float field's JSON: `float.__repr__`, or `null` when unknown or not finite."""
    if value is None:
        return "null"
    value = float(value)
    return _repr_float(value) if _isfinite(value) else "null"


def _texts(values: Any) -> str:
    if not values:
        return "[]"
    return "[" + ",".join([_text(str(x)) for x in values]) + "]"


def _nums(values: Any) -> str:
    if not values:
        return "[]"
    if None not in values:  # a loaded document holds None where NaN was written
        text = ",".join([_repr_float(float(v)) for v in values])
        if "n" not in text:  # the repr of a finite float has no `n`; `nan`, `inf` have
            return "[" + text + "]"
    return "[" + ",".join([_num(v) for v in values]) + "]"


def _measurements_text(measurements: dict[str, Any]) -> str:
    if not measurements:
        return "{}"
    doc = _jsonable(measurements)
    if _measurements_encoder is None:
        return _compact(doc)
    return "".join(_measurements_encoder(doc, 0))


def _fixed_text_of(names: tuple[str, ...], device: DeviceInfo, adc: AdcInfo | None) -> str:
    """`"lead_order":...,"derived_leads":...,"adc":...,"device":...`: what a device repeats."""
    derived = [n for n in names if n in DERIVED_LEADS]
    adc_text = "null" if adc is None else (
        f'{{"bits":{int(adc.bits)},"baseline":{_nums(adc.baseline)},'
        f'"counts_per_mv":{_num(adc.counts_per_mv)},"byte_order":{_text(str(adc.byte_order))}}}'
    )
    return (
        f'"lead_order":{_texts(names)},"derived_leads":{_texts(derived)},"adc":{adc_text},'
        f'"device":{{"serial":{_text(str(device.serial))},"model":{_text(str(device.model))},'
        f'"agent_version":{_text(str(device.agent_version))}}}'
    )


_fixed_text_cached = lru_cache(maxsize=16)(_fixed_text_of)


def _fixed_text(names: tuple[str, ...], device: DeviceInfo, adc: AdcInfo | None) -> str:
    """`_fixed_text_of`, cached by value where equal values are always written alike.

    Not so for -0.0 and 0.0 (equal, one text each), nor for non-str fields that compare
    equal but print apart (7 and 7.0): those are written afresh.
    """
    plain = all(type(x) is str for x in (*names, device.serial, device.model,
                                         device.agent_version))
    if adc is not None:
        plain = plain and type(adc.byte_order) is str
        plain = plain and adc.counts_per_mv != 0 and 0 not in adc.baseline
    try:
        return _fixed_text_cached(names, device, adc) if plain else _fixed_text_of(
            names, device, adc)
    except TypeError:  # unhashable field values: nothing to cache by
        return _fixed_text_of(names, device, adc)


def _quality_text(q: Quality, rate: int) -> str:
    gaps = ",".join([
        f'{{"start_sample":{int(g.start)},"length":{int(g.length)},'
        f'"start_s":{_num(g.start / rate)}}}'
        for g in q.gaps
    ]) if q.gaps else ""
    off = ",".join([
        f'{{"electrode":{_text(str(e.electrode))},"start_sample":{int(e.start)},'
        f'"length":{int(e.length)},"start_s":{_num(e.start / rate)},'
        f'"end_s":{_num((e.start + e.length) / rate)}}}'
        for e in q.electrodes_off
    ]) if q.electrodes_off else ""
    return (
        f'{{"frames_expected":{int(q.frames_expected)},'
        f'"frames_received":{int(q.frames_received)},"frames_lost":{int(q.frames_lost)},'
        f'"lost_fraction":{_num(q.lost_fraction)},"gaps":[{gaps}],"electrodes_off":[{off}],'
        f'"flat_leads":{_texts(q.flat_leads)},"saturated_leads":{_texts(q.saturated_leads)},'
        f'"mains_noise_uv":{_num(q.mains_noise_uv)},"bad_frames":{int(q.bad_frames)},'
        f'"verdict":{_text(str(q.verdict))},"reasons":{_texts(q.reasons)}}}'
    )


def _head(record: Record, rate: int) -> bytes:
    """`{"timestamp":...,"sampling_rate":...,"leads":` (the legacy keys come first)."""
    # isoformat pads the year to 4 digits and truncates to seconds, as the legacy key wants
    stamp = record.acquired_at.isoformat(" ", "seconds")[:19]
    return f'{{"timestamp":"{stamp}","sampling_rate":{rate},"leads":'.encode()


def _tail(record: Record, rate: int, lost: str) -> bytes:
    """`,"lost_samples":...}`: every key after `leads`, in the documented order."""
    n = record.n_samples
    rid = record.record_id
    return (
        f',"lost_samples":{lost},"acquired_at":{_text(record.acquired_at.isoformat())},'
        f'"duration_s":{_num(n / rate)},'
        f'"samples_per_lead":{n},"units":{_text(UNITS)},'
        f'{_fixed_text(tuple(record.lead_names), record.device, record.adc)},'
        f'"record_id":{"null" if rid is None else _text(str(rid))},'
        f'"quality":{_quality_text(record.quality, rate)},'
        f'"measurements":{_measurements_text(record.measurements)}}}'
    ).encode()


def _check(record: Record) -> None:
    names = record.lead_names
    samples = record.samples
    if (
        len(set(names)) == len(names)
        and samples.ndim == 2
        and samples.shape[0] == len(names)
        and record.missing.shape == samples.shape
        and samples.dtype.kind in "iu"
        and int(record.sampling_rate) > 0
    ):
        return
    where = f"record {record.record_id or record.acquired_at.isoformat()}"
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: lead names repeat ({', '.join(names)}); each must be unique")
    if record.samples.ndim != 2 or record.samples.shape[0] != len(names):
        raise ValueError(
            f"{where}: samples shape {record.samples.shape} does not match {len(names)} leads"
        )
    if record.missing.shape != record.samples.shape:
        raise ValueError(
            f"{where}: missing mask shape {record.missing.shape} differs from samples "
            f"{record.samples.shape}"
        )
    if record.samples.dtype.kind not in "iu":
        raise ValueError(f"{where}: samples are {record.samples.dtype}; integer uV expected")
    if int(record.sampling_rate) <= 0:
        raise ValueError(f"{where}: sampling rate {record.sampling_rate} must be positive")


def dumps(record: Record) -> bytes:
    """The record as canonical compact JSON bytes (the `ecg_data_{stamp}.json` content)."""
    _check(record)
    rate = int(record.sampling_rate)
    names = tuple(record.lead_names)
    samples, missing = record.samples, np.asarray(record.missing, dtype=bool)
    lost = "{}"
    if missing.any():
        samples, lost = _held(names, samples, missing)
    return bytes(_document(
        _head(record, rate), names, samples, None, _tail(record, rate, lost)))


# --- loads -------------------------------------------------------------------------------


def _lead_array(values: Any, name: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    """A JSON lead list as (numbers, missing): int64 or float64 numbers, 0 where null."""
    if not isinstance(values, list):
        raise ValueError(f"{source}: lead {name} is {type(values).__name__}, not an array")
    try:
        arr = np.array(values)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source}: lead {name} is not a flat array of numbers") from exc
    if arr.dtype.kind in "iuf" and arr.ndim == 1:
        return arr, np.zeros(arr.shape, dtype=bool)
    if arr.ndim == 0 and not values:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    if arr.dtype != object or arr.ndim != 1:
        raise ValueError(f"{source}: lead {name} holds {arr.dtype} values, not numbers or null")
    missing = np.equal(arr, np.array(None))
    arr[missing] = 0
    numbers = np.array(arr.tolist())  # numpy infers int64 or float64 from the values
    if numbers.dtype.kind not in "iuf":
        raise ValueError(f"{source}: lead {name} holds values that are not numbers")
    return numbers, missing


def _to_uv(numbers: np.ndarray, scale: float) -> np.ndarray:
    if numbers.dtype.kind == "f":
        if not np.isfinite(numbers).all():
            raise ValueError("non-finite lead value")
        numbers = np.rint(numbers * scale)
        if numbers.size and np.abs(numbers).max() >= 2.0**63:  # else the cast gives garbage
            raise ValueError("a lead value is beyond 64-bit integers; the file is damaged")
        numbers = numbers.astype(np.int64)
    elif scale != 1:
        numbers = numbers.astype(np.int64) * int(scale)
    return numbers


def _samples(
    doc: dict[str, Any], names: tuple[str, ...], legacy: bool, source: str
) -> tuple[np.ndarray, np.ndarray]:
    leads = doc.get("leads") or {}
    if not isinstance(leads, dict):
        raise ValueError(f"{source}: 'leads' must be an object of lead name -> array")
    arrays = [_lead_array(leads.get(name, []), name, source) for name in names]
    units = doc.get("units")
    if units is None:
        # Legacy: floats anywhere mean the whole file is in mV (see module docstring).
        scale = 1000.0 if any(a.dtype.kind == "f" for a, _ in arrays) else 1.0
    elif units in ("uV", "µV"):
        scale = 1.0
    elif units == "mV":
        scale = 1000.0
    else:
        raise ValueError(f"{source}: units {units!r} not understood; 'uV' or 'mV' expected")
    lengths = {len(a) for a, _ in arrays}
    n = max(lengths, default=int(doc.get("samples_per_lead") or 0))
    if len(lengths) > 1 and not legacy:
        raise ValueError(f"{source}: leads differ in length ({sorted(lengths)}); file is damaged")
    samples = np.zeros((len(names), n), dtype=np.int64)
    missing = np.ones((len(names), n), dtype=bool)
    for row, (numbers, lost) in enumerate(arrays):
        try:
            samples[row, : len(numbers)] = _to_uv(numbers, scale)
        except ValueError as exc:
            raise ValueError(f"{source}: lead {names[row]}: {exc}") from exc
        missing[row, : len(numbers)] = lost
    return _narrowed(samples, missing), missing


def _narrowed(samples: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """int64 samples with lost ones set to 0, as int32 when every value fits."""
    samples[missing] = 0
    if samples.size and np.iinfo(np.int32).min <= samples.min() and samples.max() <= np.iinfo(
        np.int32
    ).max:
        samples = samples.astype(np.int32)
    return samples


# The fast path reads the leads (all but ~1 KB of a document) with one np.fromstring instead
# of json.loads building a Python int per sample. It takes only leads exactly as `dumps`
# writes them, and proves it: the numbers it read are written again and must give back the
# same bytes. Anything else (whitespace, floats, legacy mV files, other escapes, numbers
# beyond int64) goes to the general path, so both paths always give the same result.
_LEADS_KEY = b'"leads":'
_LOST = np.iinfo(np.int64).min  # what a `null` reads as here: re-encoding rejects a real one
_LOST_TEXT = str(_LOST).encode()


def _rest_of(rest: bytes) -> dict[str, Any] | None:
    """The document with `"leads":0` spliced in, or None unless that is its only leads key.

    Any other key named leads (nested, repeated, spelled with escapes) could be the one the
    general path reads, so then the general path decides.
    """
    keys = 0

    def count(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal keys
        keys += sum(1 for key, _ in pairs if key == "leads")
        return dict(pairs)

    try:
        doc = json.loads(rest, object_pairs_hook=count)
    except ValueError:
        return None
    if keys != 1 or not isinstance(doc, dict) or type(doc.get("leads")) is not int:
        return None
    return doc


def _fast_leads(
    data: bytes,
) -> tuple[dict[str, Any], tuple[str, ...], np.ndarray, np.ndarray] | None:
    """(document without its leads, lead names, samples, missing), or None: not canonical."""
    begin = data.find(_LEADS_KEY + b"{")
    if begin < 1 or data[begin - 1] == ord("\\"):
        return None
    names: list[str] = []
    spans: list[tuple[int, int]] = []  # where each lead's numbers are (no copies yet)
    pos = begin + len(_LEADS_KEY) + 1
    while data[pos : pos + 1] == b'"':  # one `"name":[numbers]` per lead
        colon = data.find(b'":[', pos)
        close = data.find(b"]", colon)
        if colon < 0 or close < 0:
            return None
        try:
            names.append(json.loads(data[pos : colon + 1]))
        except ValueError:  # the key holds `":[`, or is not a string: not ours to guess
            return None
        spans.append((colon + 3, close))
        pos = close + 1
        if data[pos : pos + 1] == b",":
            pos += 1
    end = pos + 1
    if not names or data[pos:end] != b"}" or len(set(names)) != len(names):
        return None
    doc = _rest_of(data[:begin] + _LEADS_KEY + b"0" + data[end:])
    order = None if doc is None else doc.get("lead_order")
    if (
        doc is None
        or doc.get("units") not in (None, "uV", "µV")
        or (order and tuple(order) != tuple(names))
    ):
        return None
    samples: np.ndarray | None = None
    nulls = False
    for row, (first, stop) in enumerate(spans):
        chunk = data[first:stop]
        if b"n" in chunk:
            chunk = chunk.replace(b"null", _LOST_TEXT)
            nulls = True
        try:
            numbers = np.fromstring(chunk, dtype=np.int64, sep=",")
        except ValueError:
            return None
        if samples is None:
            samples = np.empty((len(names), numbers.size), dtype=np.int64)
        if numbers.size != samples.shape[1] or numbers.size == 0:
            return None
        samples[row] = numbers
    if samples is None:
        return None
    missing = samples == _LOST
    if nulls:
        samples[missing] = 0  # else int64 min sends the re-encoding to the slow wide path
    text = _document(b"", tuple(names), samples, missing, b"")
    value = begin + len(_LEADS_KEY)
    if len(text) != end - value or not data.startswith(text, value):
        return None
    return doc, tuple(names), _narrowed(samples, missing), missing


def _lost_mask(doc: dict[str, Any], names: tuple[str, ...], n: int,
               source: str) -> np.ndarray | None:
    """The `lost_samples` runs as a mask (leads x n), or None when there are none."""
    spans = doc.get("lost_samples")
    if not spans:
        return None
    if not isinstance(spans, dict):
        raise ValueError(f"{source}: 'lost_samples' must be an object of lead name -> "
                         "[[first sample, count], ...]; the file is damaged")
    mask = np.zeros((len(names), n), dtype=bool)
    for name, runs in spans.items():
        if name not in names:
            raise ValueError(f"{source}: lost_samples names lead {name!r}, which the file "
                             "does not have; the file is damaged")
        row = mask[names.index(name)]
        for run in runs if isinstance(runs, list) else [runs]:
            if not (isinstance(run, list) and len(run) == 2
                    and type(run[0]) is int and type(run[1]) is int
                    and run[0] >= 0 and run[1] > 0 and run[0] + run[1] <= n):
                raise ValueError(f"{source}: lost_samples of lead {name}: {run!r} is not a "
                                 f"[first sample, count] run within its {n} samples; the "
                                 "file is damaged")
            row[run[0] : run[0] + run[1]] = True
    return mask


def _acquired_at(doc: dict[str, Any], source: str) -> datetime:
    text = doc.get("acquired_at")
    try:
        if text is not None:
            return datetime.fromisoformat(text)
        return datetime.strptime(doc["timestamp"], "%Y-%m-%d %H:%M:%S")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{source}: no readable acquired_at/timestamp "
            f"(acquired_at={text!r}, timestamp={doc.get('timestamp')!r})"
        ) from exc


def _quality(q: dict[str, Any] | None) -> Quality:
    if not q:
        return Quality()
    return Quality(
        frames_expected=q.get("frames_expected", 0),
        frames_received=q.get("frames_received", 0),
        frames_lost=q.get("frames_lost", 0),
        gaps=tuple(Gap(g["start_sample"], g["length"]) for g in q.get("gaps", ())),
        electrodes_off=tuple(
            ElectrodeOff(e["electrode"], e["start_sample"], e["length"])
            for e in q.get("electrodes_off", ())
        ),
        flat_leads=tuple(q.get("flat_leads", ())),
        saturated_leads=tuple(q.get("saturated_leads", ())),
        mains_noise_uv=q.get("mains_noise_uv"),
        bad_frames=q.get("bad_frames", 0),
        verdict=q.get("verdict", Quality.verdict),
        reasons=tuple(q.get("reasons", ())),
    )


def _parse(data: bytes | str, source: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc}); the file is damaged") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: top level is {type(doc).__name__}, not an object")
    return doc


def loads(data: bytes | str, *, source: str = "ecg_data document") -> Record:
    """Read an ecg_data document (ours or the legacy `{timestamp, sampling_rate, leads}`)."""
    fast = _fast_leads(data) if type(data) is bytes else None
    if fast is None:
        doc = _parse(data, source)
        leads = doc.get("leads") or {}
        names = tuple(doc.get("lead_order") or (leads if isinstance(leads, dict) else ()))
        if isinstance(leads, dict) and set(leads) - set(names):
            raise ValueError(
                f"{source}: leads {sorted(set(leads) - set(names))} not in lead_order"
            )
    else:
        doc, names, samples, missing = fast
    try:
        rate = int(doc["sampling_rate"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{source}: sampling_rate missing or not an integer") from exc
    if fast is None:
        samples, missing = _samples(doc, names, "units" not in doc, source)
    lost = _lost_mask(doc, names, samples.shape[1], source)
    if lost is not None:  # held values stand in the leads for legacy readers: not data
        missing = missing | lost
        samples[lost] = 0
    adc = doc.get("adc")
    device = doc.get("device") or {}
    try:
        return Record(
            acquired_at=_acquired_at(doc, source),
            sampling_rate=rate,
            samples=samples,
            missing=missing,
            lead_names=names,
            record_id=doc.get("record_id"),
            device=DeviceInfo(**device),
            adc=None if adc is None else AdcInfo(
                bits=adc["bits"],
                counts_per_mv=adc["counts_per_mv"],
                byte_order=adc["byte_order"],
                baseline=tuple(adc["baseline"]),
            ),
            quality=_quality(doc.get("quality")),
            measurements=doc.get("measurements") or {},
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{source}: a required field is missing or mistyped ({exc})") from exc
