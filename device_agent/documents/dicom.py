"""The record as a DICOM 12-Lead ECG (Waveform Storage), the file hospital ECG systems import.

`encode_ecg` is pure: a Record (and the patient block) in, the bytes of a DICOM Part 10 file
out (Explicit VR Little Endian), with no clock and no randomness, so encoding the same
record twice gives the same bytes. SOP class 1.2.840.10008.5.1.4.1.1.9.1.1 (PS3.3 A.34.3).

Waveform: one multiplex group of the 12 leads in LEAD_ORDER, 16-bit signed (SS) samples
interleaved per sample, at the record's rate. Each channel's sensitivity is in uV per
stored unit: 1 when the lead's received samples fit -32767..32767 uV (always, for a board's
12-bit ADC); otherwise the smallest whole number of uV that makes them fit, and each stored
value is the sample divided by it, rounded (so it is within half a step of the JSON's). A
lost sample is stored as PADDING_VALUE (-32768), which no received sample can take, and
WaveformPaddingValue says so.

Codes (checked against PS3.16 as pydicom 3.0 ships it):
- leads, CID 3001 "ECG Leads" (scheme MDC, ISO/IEEE 11073-10102): I 2:1, II 2:2, V1..V6
  2:3..2:8, III 2:61, aVR 2:62, aVL 2:63, aVF 2:64. (The older SCPECG codes 5.6.3-9-x
  were replaced by these in the standard.) III and the augmented leads are written as the
  ordinary leads, as every 12-lead electrocardiograph derives them from I and II.
- measurements, as numeric WaveformAnnotationSequence items over all channels. Neither ECG
  IOD names a context group for their concept names (PS3.3 C.10.10, A.34.3.4), so they
  are those of TID 3713 "ECG Global Measurements", where an ECG report puts the same
  values: Ventricular Heart Rate MDC 2:16016; CID 3228 "ECG Timing Measurements": RR
  2:16168, PR 2:15872, QRS 2:16156, QT 2:16160; CID 3227 "QTc Measurements": Bazett
  2:15880, Fridericia 2:15892; CID 3229 "ECG Axis Measurements": P 2:16128, QRS 2:16132,
  T 2:16136. Units in UCUM: ms, deg, /min. Channel sensitivity units: uV (UCUM).

UIDs: `uid_root` + the decimal of a UUID5 (namespace UID_NAMESPACE) of the record's id and
the purpose ("study", "series", "instance"): with the default root "2.25." that is the
ISO/IEC 9834-8 form of a UUID, no registered root needed. A record without a record_id is
named by a SHA-256 of its time, device serial and samples, so it too re-encodes the same.

Patient module: only what the patient block holds (first_name/last_name, else patient_name
or name, patient_id or id, dob or date_of_birth as YYYY-MM-DD, gender or sex, age, doctor
as the referring physician and doctor_mobile as their telephone, Org. as the institution;
the legacy date_time, when the details were taken, has no place in these modules and stays
in patient_details); the type-2 attributes the IOD requires are written
empty when the block lacks them. Text is cut to the VR's length (logged, never the text).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from device_agent import __version__
from device_agent.core.record import LEAD_ORDER, DeviceInfo, Record

log = logging.getLogger(__name__)

ECG_12LEAD_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.9.1.1"
DEFAULT_UID_ROOT = "2.25."
# fixed forever: changing it renames every record's study, series and instance
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:device_agent:dicom")
PADDING_VALUE = -32768
_LIMIT = 32767  # largest magnitude a received sample may take once stored
RATE_RANGE_HZ = (200, 1000)  # PS3.3 A.34.3.4: 12-lead ECG sampling frequency
MAX_SAMPLES = 16384  # PS3.3 A.34.3.4: samples per multiplex group

# lead -> (code value, code meaning), CID 3001, scheme MDC
LEAD_CODES: dict[str, tuple[str, str]] = {
    "I": ("2:1", "Lead I"),
    "II": ("2:2", "Lead II"),
    "III": ("2:61", "Lead III"),
    "aVR": ("2:62", "aVR, augmented voltage, right"),
    "aVL": ("2:63", "aVL, augmented voltage, left"),
    "aVF": ("2:64", "aVF, augmented voltage, foot"),
    "V1": ("2:3", "Lead V1"),
    "V2": ("2:4", "Lead V2"),
    "V3": ("2:5", "Lead V3"),
    "V4": ("2:6", "Lead V4"),
    "V5": ("2:7", "Lead V5"),
    "V6": ("2:8", "Lead V6"),
}

_MS = ("ms", "millisecond")
_DEG = ("deg", "degree")
_PER_MIN = ("/min", "/min")
# measurements key -> (scheme, code value, code meaning, (UCUM unit, unit meaning))
MEASUREMENT_CODES: dict[str, tuple[str, str, str, tuple[str, str]]] = {
    "heart_rate_bpm": ("MDC", "2:16016", "Ventricular Heart Rate", _PER_MIN),
    "rr_ms": ("MDC", "2:16168", "RR interval global", _MS),
    "pr_ms": ("MDC", "2:15872", "PR interval global", _MS),
    "qrs_ms": ("MDC", "2:16156", "QRS duration global", _MS),
    "qt_ms": ("MDC", "2:16160", "QT interval global", _MS),
    "qtc_bazett_ms": ("MDC", "2:15880", "QTc global using Bazett formula", _MS),
    "qtc_fridericia_ms": ("MDC", "2:15892", "QTc global using Fredericia formula", _MS),
    "p_axis_deg": ("MDC", "2:16128", "P Axis", _DEG),
    "qrs_axis_deg": ("MDC", "2:16132", "QRS axis", _DEG),
    "t_axis_deg": ("MDC", "2:16136", "T axis", _DEG),
}
# older measurement blocks name the mean RR interval this way; used when rr_ms is absent
_ALIASES = {"rr_ms": "rr_mean_ms"}

_UID_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")
_SEX = {"m": "M", "male": "M", "f": "F", "female": "F", "o": "O", "other": "O"}
_TEXT_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC"})
_PN_ROOM = 63  # a PN component group holds 64 characters, one of them our "^"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Equipment:
    """The General Equipment module: who made the unit and what software wrote the file."""

    manufacturer: str = ""
    model: str | None = None
    serial: str | None = None
    software_version: str | None = None

    @classmethod
    def of(cls, device: DeviceInfo, *, manufacturer: str = "") -> Equipment:
        """Equipment from a record's DeviceInfo ("unknown" fields are left out)."""

        def known(value: str) -> str | None:
            return value if value and value != "unknown" else None

        return cls(manufacturer, known(device.model), known(device.serial),
                   known(device.agent_version))


@dataclass(frozen=True)
class DisplayFilter:
    """Filters already applied to the samples, in Hz; None = that filter was not applied."""

    highpass_hz: float | None = None
    lowpass_hz: float | None = None
    notch_hz: float | None = None


def encode_ecg(
    record: Record,
    patient: Mapping[str, Any] | None,
    *,
    equipment: Equipment,
    filters: DisplayFilter | None = None,
    uid_root: str = DEFAULT_UID_ROOT,
) -> bytes:
    """The record as a DICOM 12-Lead ECG Waveform Storage file (Part 10 bytes)."""
    ds = build_dataset(record, patient, equipment=equipment, filters=filters,
                       uid_root=uid_root)
    out = io.BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def build_dataset(
    record: Record,
    patient: Mapping[str, Any] | None,
    *,
    equipment: Equipment,
    filters: DisplayFilter | None = None,
    uid_root: str = DEFAULT_UID_ROOT,
) -> Dataset:
    """The pydicom Dataset (file meta included) that encode_ecg writes."""
    _check(record, uid_root)
    ds = Dataset()
    _patient(ds, patient or {})
    _identity(ds, record, uid_root)
    _dates(ds, record.acquired_at)
    _equipment(ds, equipment, patient or {})
    if any(elem.VR in _TEXT_VRS and not str(elem.value).isascii() for elem in ds):
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8; the default repertoire is ASCII
    ds.AcquisitionContextSequence = Sequence()  # type 2: no TID 3401 context items known
    ds.WaveformSequence = Sequence([_multiplex_group(record, filters)])
    annotations = _annotations(record.measurements)
    if annotations:
        ds.WaveformAnnotationSequence = Sequence(annotations)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(_uid(DEFAULT_UID_ROOT, "device_agent", "implementation"))
    meta.ImplementationVersionName = f"DEVAGENT_{__version__}"[:16]
    ds.file_meta = meta
    return ds


def lead_step_uv(samples: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Per lead, the whole number of uV per stored unit that fits its samples in int16."""
    peak = np.abs(np.where(missing, 0, samples.astype(np.int64))).max(axis=1, initial=0)
    step: np.ndarray = np.maximum(1, -(-peak // _LIMIT)).astype(np.int64)
    return step


def quantise(samples: np.ndarray, missing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int16 stored values (leads, n) with lost ones PADDING_VALUE, uV per unit per lead)."""
    step = lead_step_uv(samples, missing)
    wide = samples.astype(np.int64)
    coarse = step > 1
    if coarse.any():  # round half away from zero, in integers
        s = step[coarse, None]
        rows = wide[coarse]
        wide[coarse] = np.sign(rows) * ((np.abs(rows) + s // 2) // s)
    stored = np.where(missing, PADDING_VALUE, wide).astype(np.int16)
    return stored, step


# --- modules ---------------------------------------------------------------------------------


def _check(record: Record, uid_root: str) -> None:
    if tuple(record.lead_names) != LEAD_ORDER:
        raise ValueError(
            f"record {record.record_id} has leads {', '.join(record.lead_names)}; a DICOM "
            f"12-lead ECG needs exactly {', '.join(LEAD_ORDER)}"
        )
    low, high = RATE_RANGE_HZ
    if not low <= record.sampling_rate <= high:
        raise ValueError(
            f"record {record.record_id} is sampled at {record.sampling_rate} Hz; a DICOM "
            f"12-lead ECG allows {low}-{high} Hz: resample it first"
        )
    if not 0 < record.n_samples <= MAX_SAMPLES:
        raise ValueError(
            f"record {record.record_id} has {record.n_samples} samples per lead; a DICOM "
            f"12-lead ECG holds 1-{MAX_SAMPLES}: cut it shorter"
        )
    if not _UID_ROOT_RE.match(uid_root) or len(uid_root) > 40:
        raise ValueError(
            f"DICOM UID root {uid_root!r} must be dotted digits ending in '.', at most 40 "
            "characters (e.g. '2.25.')"
        )


def _uid(root: str, name: str, purpose: str) -> str:
    number = uuid.uuid5(UID_NAMESPACE, f"{name}/{purpose}").int
    return root + str(number % 10 ** (64 - len(root)))


def _record_name(record: Record) -> str:
    """The record's id, or a digest of what makes it this record when it has none."""
    if record.record_id:
        return record.record_id
    digest = hashlib.sha256()
    digest.update(record.acquired_at.isoformat().encode())
    digest.update(record.device.serial.encode())
    digest.update(np.where(record.missing, 0, record.samples).astype("<i4").tobytes())
    digest.update(np.packbits(record.missing).tobytes())
    return "sha256:" + digest.hexdigest()


def _identity(ds: Dataset, record: Record, uid_root: str) -> None:
    name = _record_name(record)
    ds.SOPClassUID = ECG_12LEAD_SOP_CLASS
    ds.SOPInstanceUID = _uid(uid_root, name, "instance")
    ds.StudyInstanceUID = _uid(uid_root, name, "study")
    ds.SeriesInstanceUID = _uid(uid_root, name, "series")
    ds.Modality = "ECG"
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1


def _dates(ds: Dataset, at: datetime) -> None:
    """Study, content and acquisition date/time: the record's one timestamp, its own offset."""
    date = at.strftime("%Y%m%d")
    time = at.strftime("%H%M%S") + (f".{at.microsecond:06d}" if at.microsecond else "")
    offset = at.utcoffset()
    zone = "" if offset is None else _offset(offset)
    ds.StudyDate = ds.ContentDate = date
    ds.StudyTime = ds.ContentTime = time
    ds.AcquisitionDateTime = date + time + zone
    if zone:
        ds.TimezoneOffsetFromUTC = zone


def _offset(offset: timedelta) -> str:
    minutes = round(offset.total_seconds() / 60)
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"


def _text(value: Any, limit: int, what: str, *, pn: bool = False) -> str:
    """A patient-block value as DICOM text: control characters and delimiters out, cut to fit."""
    text = _CONTROL.sub(" ", str(value)).replace("\\", " ")
    if pn:
        text = text.replace("^", " ").replace("=", " ")
    text = " ".join(text.split())
    if len(text) > limit:
        log.warning("patient %s is longer than DICOM allows (%d characters); cut to fit",
                    what, limit)
        text = text[:limit].rstrip()
    return text


def _given(patient: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = patient.get(key)
        if value is not None and value != "":
            return value
    return None


def _patient(ds: Dataset, patient: Mapping[str, Any]) -> None:
    """Patient, patient study and referring physician: what the block gives, nothing else."""
    first, last = _given(patient, "first_name"), _given(patient, "last_name")
    if first is not None or last is not None:
        family = _text(last or "", _PN_ROOM, "last name", pn=True)
        given = _text(first or "", _PN_ROOM, "first name", pn=True)
        if len(family) + len(given) > _PN_ROOM:  # one group holds both: share the room
            log.warning("patient name is longer than DICOM allows (%d characters); cut to fit",
                        _PN_ROOM + 1)
            given = given[: max(_PN_ROOM - len(family), _PN_ROOM // 2)].rstrip()
            family = family[: _PN_ROOM - len(given)].rstrip()
        name = family + "^" + given
    elif (whole := _given(patient, "patient_name", "name")) is not None:
        name = _person(whole, "name")
    else:
        name = ""
    ds.PatientName = name
    pid = _given(patient, "patient_id", "id")
    ds.PatientID = "" if pid is None else _text(pid, 64, "id")
    ds.PatientBirthDate = _birth_date(_given(patient, "dob", "date_of_birth"))
    sex = _given(patient, "gender", "sex")
    ds.PatientSex = _SEX.get(str(sex).strip().lower(), "") if sex is not None else ""
    if sex is not None and not ds.PatientSex:
        log.warning("patient gender is not male/female/other; PatientSex left empty")
    age = _given(patient, "age")
    if age is not None and str(age).strip().isdigit() and int(str(age).strip()) <= 999:
        ds.PatientAge = f"{int(str(age).strip()):03d}Y"
    doctor = _given(patient, "doctor")
    ds.ReferringPhysicianName = "" if doctor is None else _person(doctor, "doctor")
    phone = _given(patient, "doctor_mobile")
    if phone is not None:  # SH: 16 characters
        ds.ReferringPhysicianTelephoneNumbers = _text(phone, 16, "doctor's phone")


def _person(value: Any, what: str) -> str:
    """Free text naming a person, whole, as the family name: `text^`.

    The caret keeps a reader from taking the spaces for the retired ACR-NEMA name form
    (family name, space, given name) and splitting the text where the person did not.
    """
    return _text(value, _PN_ROOM, what, pn=True) + "^"


def _birth_date(value: Any) -> str:
    if value is None:
        return ""
    text = str(value).strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(text, fmt).strftime("%Y%m%d")
        except ValueError:
            continue
    log.warning("patient date of birth is not YYYY-MM-DD; PatientBirthDate left empty")
    return ""


def _equipment(ds: Dataset, equipment: Equipment, patient: Mapping[str, Any]) -> None:
    ds.Manufacturer = _text(equipment.manufacturer, 64, "manufacturer")
    if equipment.model:
        ds.ManufacturerModelName = _text(equipment.model, 64, "model")
    if equipment.serial:
        ds.DeviceSerialNumber = _text(equipment.serial, 64, "serial")
    if equipment.software_version:
        ds.SoftwareVersions = _text(equipment.software_version, 64, "software version")
    org = _given(patient, "Org.")
    if org is not None:
        ds.InstitutionName = _text(org, 64, "institution")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _ds(value: float) -> str:
    """A decimal string (DS, at most 16 characters) for a finite float."""
    return format_number_as_ds(float(value))


def _multiplex_group(record: Record, filters: DisplayFilter | None) -> Dataset:
    stored, step = quantise(record.samples, record.missing)
    group = Dataset()
    group.WaveformOriginality = "ORIGINAL"
    group.NumberOfWaveformChannels = len(LEAD_ORDER)
    group.NumberOfWaveformSamples = record.n_samples
    group.SamplingFrequency = _ds(record.sampling_rate)
    group.MultiplexGroupLabel = "RHYTHM"
    channels = []
    for lead, uv_per_unit in zip(LEAD_ORDER, step.tolist(), strict=True):
        ch = Dataset()
        code, meaning = LEAD_CODES[lead]
        ch.ChannelSourceSequence = Sequence([_code(code, "MDC", meaning)])
        ch.ChannelSensitivity = _ds(uv_per_unit)
        ch.ChannelSensitivityUnitsSequence = Sequence([_code("uV", "UCUM", "microvolt")])
        ch.ChannelSensitivityCorrectionFactor = "1"
        ch.ChannelBaseline = "0"
        ch.ChannelSampleSkew = "0"
        ch.WaveformBitsStored = 16
        if filters is not None:
            if filters.highpass_hz is not None:
                ch.FilterLowFrequency = _ds(filters.highpass_hz)
            if filters.lowpass_hz is not None:
                ch.FilterHighFrequency = _ds(filters.lowpass_hz)
            if filters.notch_hz is not None:
                ch.NotchFilterFrequency = _ds(filters.notch_hz)
        channels.append(ch)
    group.ChannelDefinitionSequence = Sequence(channels)
    group.WaveformBitsAllocated = 16
    group.WaveformSampleInterpretation = "SS"
    group.WaveformPaddingValue = np.int16(PADDING_VALUE).astype("<i2").tobytes()
    group.WaveformData = np.ascontiguousarray(stored.T, dtype="<i2").tobytes()
    return group


def _measurement(measurements: Mapping[str, Any], key: str) -> float | None:
    value = measurements.get(key)
    if value is None and key in _ALIASES:
        value = measurements.get(_ALIASES[key])
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _annotations(measurements: Mapping[str, Any]) -> list[Dataset]:
    """One numeric annotation over all channels per measurement the record holds."""
    items = []
    for key, (scheme, value, meaning, (unit, unit_meaning)) in MEASUREMENT_CODES.items():
        number = _measurement(measurements, key)
        if number is None:
            continue
        item = Dataset()
        item.ConceptNameCodeSequence = Sequence([_code(value, scheme, meaning)])
        item.NumericValue = _ds(number)
        item.MeasurementUnitsCodeSequence = Sequence([_code(unit, "UCUM", unit_meaning)])
        item.ReferencedWaveformChannels = [1, 0]  # multiplex group 1, channel 0: all of them
        items.append(item)
    return items
