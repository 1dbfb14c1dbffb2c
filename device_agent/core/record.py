"""The 12-lead record: what one capture holds, and the pure functions that build it.

Lead values are integer microvolts with the baseline removed; a lost sample is marked in
`missing` (and its value is 0). Every name, key and date folder of a record derives from
its single `acquired_at`, read once when the capture starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from device_agent.core.config import Settings

MEASURED_LEADS = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
DERIVED_LEADS = ("III", "aVR", "aVL", "aVF")
LEAD_ORDER = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
# Electrode flags in frame order: LA (I bit 5), RA (II bit 5), LL (II bit 6), V1..V6.
ELECTRODES = ("LA", "RA", "LL", "V1", "V2", "V3", "V4", "V5", "V6")

VERDICT_OK = "ok"
VERDICT_WARN = "warning"
VERDICT_REJECTED = "rejected"


@dataclass(frozen=True)
class Gap:
    """A run of lost samples: first sample index and how many."""

    start: int
    length: int


@dataclass(frozen=True)
class ElectrodeOff:
    """An electrode reported off from sample `start` for `length` samples."""

    electrode: str
    start: int
    length: int


@dataclass(frozen=True)
class Quality:
    """Signal-quality findings for one record, with one overall verdict."""

    frames_expected: int = 0
    frames_received: int = 0
    frames_lost: int = 0
    gaps: tuple[Gap, ...] = ()
    electrodes_off: tuple[ElectrodeOff, ...] = ()
    flat_leads: tuple[str, ...] = ()
    saturated_leads: tuple[str, ...] = ()
    mains_noise_uv: float | None = None
    bad_frames: int = 0
    verdict: str = VERDICT_OK
    reasons: tuple[str, ...] = ()

    @property
    def lost_fraction(self) -> float:
        return self.frames_lost / self.frames_expected if self.frames_expected else 0.0


@dataclass(frozen=True)
class AdcInfo:
    """How raw counts map to microvolts, so raw counts can be recovered."""

    bits: int = 12
    counts_per_mv: float = 1000.0
    byte_order: str = "high-first"
    baseline: tuple[float, ...] = ()  # per measured channel, counts, in MEASURED_LEADS order


@dataclass(frozen=True)
class DeviceInfo:
    serial: str = "unknown"
    model: str = "unknown"
    agent_version: str = "unknown"


@dataclass(frozen=True, eq=False)
class Record:
    """One capture: 12 leads (LEAD_ORDER) x n samples, int32 microvolts."""

    acquired_at: datetime
    sampling_rate: int
    samples: np.ndarray  # int32, shape (len(lead_names), n)
    missing: np.ndarray  # bool, same shape; True where the sample was lost
    lead_names: tuple[str, ...] = LEAD_ORDER
    record_id: str | None = None
    device: DeviceInfo = field(default_factory=DeviceInfo)
    adc: AdcInfo | None = None
    quality: Quality = field(default_factory=Quality)
    measurements: dict[str, Any] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(self.samples.shape[1])

    @property
    def stamp(self) -> str:
        """`YYYYMMDD_HHMMSS` in the acquisition's local time: every name derives from it."""
        return self.acquired_at.strftime("%Y%m%d_%H%M%S")

    def lead(self, name: str) -> np.ndarray:
        """One lead as float64 microvolts with NaN where lost."""
        row: np.ndarray = self.samples[self.lead_names.index(name)].astype(np.float64)
        row[self.missing[self.lead_names.index(name)]] = np.nan
        return row

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        return (
            self.acquired_at == other.acquired_at
            and self.acquired_at.utcoffset() == other.acquired_at.utcoffset()
            and self.sampling_rate == other.sampling_rate
            and self.lead_names == other.lead_names
            and self.record_id == other.record_id
            and self.device == other.device
            and self.adc == other.adc
            and self.quality == other.quality
            and self.measurements == other.measurements
            and self.samples.shape == other.samples.shape
            and np.array_equal(self.missing, other.missing)
            and np.array_equal(
                np.where(self.missing, 0, self.samples), np.where(other.missing, 0, other.samples)
            )
        )

    __hash__ = None  # type: ignore[assignment]


def derive_leads(i_uv: np.ndarray, ii_uv: np.ndarray) -> dict[str, np.ndarray]:
    """Einthoven and Goldberger leads from baseline-removed I and II (float arrays, uV)."""
    return {
        "III": ii_uv - i_uv,
        "aVR": -(i_uv + ii_uv) / 2.0,
        "aVL": i_uv - ii_uv / 2.0,
        "aVF": ii_uv - i_uv / 2.0,
    }


# --- building a record from decoded frames (pure) ---------------------------------------------

ADC_MAX = 4095
FLAT_UV = 20.0  # a lead whose received samples span less than this is a flat line
MAINS_WARN_UV = 50.0  # mains-frequency amplitude above this is worth a warning


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of every run of True in a 1-D bool array."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def mains_amplitude(uv: np.ndarray, present: np.ndarray, rate: float, mains_hz: float) -> float:
    """Amplitude (uV) of the mains-frequency component of one lead: a one-bin DFT."""
    n = int(present.sum())
    if n < rate / mains_hz * 4:
        return 0.0
    t = np.flatnonzero(present) / rate
    x = uv[present] - uv[present].mean()
    return float(2.0 * abs(np.dot(x, np.exp(-2j * np.pi * mains_hz * t))) / n)


def build_record(
    position: np.ndarray,
    counts: np.ndarray,
    electrodes: np.ndarray,
    *,
    n_samples: int,
    acquired_at: datetime,
    settings: Settings,
    device: DeviceInfo | None = None,
    record_id: str | None = None,
    bad_frames: int = 0,
) -> Record:
    """A Record from decoded frames: position (n,) sample index, counts (n, 8), flags (n, 9).

    Baseline: each measured channel's median count over the samples received in this
    capture (robust to QRS complexes, needs no filter state, and is recorded in `adc` so
    raw counts = uV * counts_per_mv / 1000 + baseline). Derived leads come from I and II
    after that. Samples never received are `missing` (value 0), at their own positions;
    frames outside 0..n_samples-1 are ignored. `settings` gives sampling_rate,
    counts_per_mv, byte_order, mains_hz, max_lost_fraction and max_gap_ms.
    """
    rate = int(settings.sampling_rate)
    cpm = float(settings.counts_per_mv)
    keep = (position >= 0) & (position < n_samples)
    position, counts, electrodes = position[keep], counts[keep], electrodes[keep]
    received = np.zeros(n_samples, bool)
    received[position] = True
    raw = np.zeros((len(MEASURED_LEADS), n_samples), np.float64)
    raw[:, position] = counts.T
    if position.size:
        baseline = np.median(counts.astype(np.float64), axis=0)
    else:
        baseline = np.full(len(MEASURED_LEADS), 2048.0)
    uv = (raw - baseline[:, None]) * (1000.0 / cpm)
    uv[:, ~received] = 0.0
    by_name = dict(zip(MEASURED_LEADS, uv, strict=True))
    by_name.update(derive_leads(by_name["I"], by_name["II"]))
    samples = np.rint(np.stack([by_name[name] for name in LEAD_ORDER])).astype(np.int32)
    missing = np.broadcast_to(~received, samples.shape).copy()

    flags = np.ones((len(ELECTRODES), n_samples), bool)
    flags[:, position] = electrodes.T
    quality = _quality(
        samples, received, flags, counts, rate=rate, settings=settings, bad_frames=bad_frames
    )
    adc = AdcInfo(bits=12, counts_per_mv=cpm, byte_order=str(settings.byte_order),
                  baseline=tuple(float(b) for b in baseline))
    return Record(
        acquired_at=acquired_at, sampling_rate=rate, samples=samples, missing=missing,
        record_id=record_id, device=device or DeviceInfo(), adc=adc, quality=quality,
    )


def _quality(
    samples: np.ndarray, received: np.ndarray, flags: np.ndarray, counts: np.ndarray, *,
    rate: int, settings: Settings, bad_frames: int,
) -> Quality:
    n = received.size
    lost = n - int(received.sum())
    gaps = tuple(Gap(s, length) for s, length in runs(~received))
    off = tuple(
        ElectrodeOff(name, s, length)
        for name, row in zip(ELECTRODES, flags, strict=True)
        for s, length in runs(~row & received)
    )
    flat, noise = [], 0.0
    if received.any():
        for name, row in zip(LEAD_ORDER, samples, strict=True):
            got = row[received]
            if int(got.max()) - int(got.min()) < FLAT_UV:
                flat.append(name)
        for name in MEASURED_LEADS:
            row = samples[LEAD_ORDER.index(name)].astype(np.float64)
            noise = max(noise, mains_amplitude(row, received, rate, float(settings.mains_hz)))
    rails = (counts == 0) | (counts == ADC_MAX)
    saturated = tuple(name for name, hit in zip(MEASURED_LEADS, rails.any(axis=0), strict=True)
                      if hit)

    rejected, warnings = [], []
    share = lost / n if n else 1.0
    longest = max((g.length for g in gaps), default=0)
    longest_ms = longest * 1000.0 / rate
    if share > settings.max_lost_fraction:
        rejected.append(f"lost {lost} of {n} samples ({share:.2%}), over the "
                        f"{settings.max_lost_fraction:.2%} allowed")
    if longest_ms > settings.max_gap_ms:
        rejected.append(f"one gap of {longest} samples ({longest_ms:.0f} ms), over the "
                        f"{settings.max_gap_ms:g} ms allowed")
    if lost and not rejected:
        warnings.append(f"lost {lost} of {n} samples in {len(gaps)} gap(s)")
    for name in dict.fromkeys(e.electrode for e in off):
        secs = sum(e.length for e in off if e.electrode == name) / rate
        warnings.append(f"electrode {name} off for {secs:.2f} s")
    if flat:
        warnings.append("flat line on " + ", ".join(flat))
    if saturated:
        warnings.append("saturated at the ADC rails on " + ", ".join(saturated))
    if noise > MAINS_WARN_UV:
        warnings.append(f"mains noise {noise:.0f} uV at {settings.mains_hz} Hz")
    verdict = VERDICT_REJECTED if rejected else VERDICT_WARN if warnings else VERDICT_OK
    return Quality(
        frames_expected=n, frames_received=n - lost, frames_lost=lost, gaps=gaps,
        electrodes_off=off, flat_leads=tuple(flat), saturated_leads=saturated,
        mains_noise_uv=round(noise, 1), bad_frames=bad_frames, verdict=verdict,
        reasons=tuple(rejected + warnings),
    )
