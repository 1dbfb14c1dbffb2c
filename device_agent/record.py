"""The 12-lead record: what one capture holds, and the pure functions that build it.

Lead values are integer microvolts with the baseline removed; a lost sample is marked in
`missing` (and its value is 0). Every name, key and date folder of a record derives from
its single `acquired_at`, read once when the capture starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

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
    def duration_s(self) -> float:
        return self.n_samples / self.sampling_rate

    @property
    def stamp(self) -> str:
        """`YYYYMMDD_HHMMSS` in the acquisition's local time: every name derives from it."""
        return self.acquired_at.strftime("%Y%m%d_%H%M%S")

    def lead(self, name: str) -> np.ndarray:
        """One lead as float64 microvolts with NaN where lost."""
        row = self.samples[self.lead_names.index(name)].astype(np.float64)
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
