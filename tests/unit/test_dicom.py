"""dicom.encode_ecg: a real record as a DICOM 12-lead ECG, read back with pydicom."""

from __future__ import annotations

import dataclasses
import io
from datetime import datetime, timedelta, timezone

import numpy as np
import pydicom
import pytest
from pydicom.waveforms.numpy_handler import multiplex_array

from device_agent.core.record import LEAD_ORDER, DeviceInfo, Record
from device_agent.documents import dicom, ecgdata
from device_agent.documents.dicom import PADDING_VALUE, DisplayFilter, Equipment, encode_ecg
from device_agent.lab.wfdb import to_record

# pydicom warns (rather than fails) on a value its VR does not allow: make that a failure
pytestmark = pytest.mark.filterwarnings("error::UserWarning")

AT = datetime(2026, 11, 27, 9, 30, 5, tzinfo=timezone(timedelta(hours=1)))
RECORD_ID = "3f2b8c1e-5a7d-4e10-9b6a-0c1d2e3f4a5b"
EQUIPMENT = Equipment("Example Medical", "ECG12-PI", "SN-0042", "0.1.0")
MEASUREMENTS = {
    "heart_rate_bpm": 68.6, "rr_ms": 875, "pr_ms": 158, "qrs_ms": 94, "qt_ms": 392,
    "qtc_bazett_ms": 419.1, "qtc_fridericia_ms": 410.0, "p_axis_deg": 52,
    "qrs_axis_deg": -12, "t_axis_deg": None,  # not measured: left out
    "beats": 12, "lead": "II", "method": "Pan-Tompkins",  # not measurements DICOM codes
}
# synthetic: no real person
PATIENT = {"first_name": "Testa", "last_name": "Synthetica", "age": "59", "gender": "Female",
           "patient_id": "SYN-0001", "dob": "1967-03-14", "doctor": "Dr Example",
           "Org.": "Test Clinic"}


def with_losses(record: Record) -> Record:
    """The record with some lost samples: a 40-sample gap in every lead, one on V3 alone."""
    missing = record.missing.copy()
    missing[:, 1200:1240] = True
    missing[LEAD_ORDER.index("V3"), 17] = True
    return dataclasses.replace(record, samples=np.where(missing, 0, record.samples),
                               missing=missing)


@pytest.fixture
def json_record(ecg_data_dir) -> Record:
    """HR06000 with losses and measurements, as the package's JSON carries it."""
    record = to_record(ecg_data_dir / "HR06000", acquired_at=AT, record_id=RECORD_ID,
                       device=DeviceInfo("SN-0042", "ECG12-PI", "0.1.0"))
    record = dataclasses.replace(with_losses(record), measurements=dict(MEASUREMENTS))
    return ecgdata.loads(ecgdata.dumps(record))


def read(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def stored_and_uv(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw stored values (leads, n), uV per unit per lead, values in uV (leads, n))."""
    raw = multiplex_array(ds, 0, as_raw=True).T
    channels = ds.WaveformSequence[0].ChannelDefinitionSequence
    step = np.array([float(ch.ChannelSensitivity) * float(ch.ChannelSensitivityCorrectionFactor)
                     for ch in channels])
    base = np.array([float(ch.ChannelBaseline) for ch in channels])
    return raw, step, raw * step[:, None] + base[:, None]


def numeric_annotations(ds: pydicom.Dataset) -> dict[tuple[str, str], tuple[float, str]]:
    """(scheme, code) -> (numeric value, UCUM unit) for each numeric annotation."""
    out = {}
    for item in ds.get("WaveformAnnotationSequence", []):
        name = item.ConceptNameCodeSequence[0]
        unit = item.MeasurementUnitsCodeSequence[0]
        assert unit.CodingSchemeDesignator == "UCUM"
        assert list(item.ReferencedWaveformChannels) == [1, 0]
        out[(name.CodingSchemeDesignator, name.CodeValue)] = (float(item.NumericValue),
                                                              unit.CodeValue)
    return out


def test_samples_read_back_equal_to_the_json_and_lost_ones_are_padding(json_record):
    ds = read(encode_ecg(json_record, PATIENT, equipment=EQUIPMENT))
    assert ds.SOPClassUID == dicom.ECG_12LEAD_SOP_CLASS and ds.Modality == "ECG"
    group = ds.WaveformSequence[0]
    assert group.WaveformBitsAllocated == 16 and group.WaveformSampleInterpretation == "SS"
    assert float(group.SamplingFrequency) == 500
    assert group.NumberOfWaveformChannels == 12 and group.NumberOfWaveformSamples == 5000
    assert int.from_bytes(group.WaveformPaddingValue, "little", signed=True) == PADDING_VALUE

    raw, step, uv = stored_and_uv(ds)
    lost = json_record.missing
    assert lost.sum() == 12 * 40 + 1
    np.testing.assert_array_equal(raw == PADDING_VALUE, lost)
    np.testing.assert_array_equal(step, 1.0)  # a real ECG fits int16 at 1 uV a unit
    np.testing.assert_array_equal(uv[~lost], json_record.samples[~lost])


def test_channels_are_the_twelve_leads_in_order_with_their_cid_3001_codes(json_record):
    ds = read(encode_ecg(json_record, None, equipment=EQUIPMENT))
    channels = ds.WaveformSequence[0].ChannelDefinitionSequence
    expected = ["2:1", "2:2", "2:61", "2:62", "2:63", "2:64",
                "2:3", "2:4", "2:5", "2:6", "2:7", "2:8"]  # PS3.16 CID 3001, scheme MDC
    assert [ch.ChannelSourceSequence[0].CodeValue for ch in channels] == expected
    for lead, ch in zip(LEAD_ORDER, channels, strict=True):
        source = ch.ChannelSourceSequence[0]
        assert source.CodingSchemeDesignator == "MDC"
        assert source.CodeMeaning.endswith(lead) or source.CodeMeaning.startswith(lead)
        units = ch.ChannelSensitivityUnitsSequence[0]
        assert (units.CodeValue, units.CodingSchemeDesignator) == ("uV", "UCUM")
        assert float(ch.ChannelBaseline) == 0 and float(ch.ChannelSampleSkew) == 0
        assert ch.WaveformBitsStored == 16
        assert "FilterLowFrequency" not in ch and "NotchFilterFrequency" not in ch


def test_a_lead_beyond_int16_is_stored_in_coarser_steps_within_one_step(json_record):
    samples = json_record.samples.copy()
    v2 = LEAD_ORDER.index("V2")
    samples[v2] = samples[v2] * 50 + 7  # ~ +-60 mV: past int16 at 1 uV a unit
    record = dataclasses.replace(json_record, samples=np.where(json_record.missing, 0, samples))
    peak = int(np.abs(record.samples[v2]).max())
    assert peak > 32767

    raw, step, uv = stored_and_uv(read(encode_ecg(record, None, equipment=EQUIPMENT)))
    assert step[v2] == -(-peak // 32767) and step[v2] > 1
    assert np.delete(step, v2).tolist() == [1.0] * 11
    lost = record.missing
    np.testing.assert_array_equal(raw == PADDING_VALUE, lost)
    others = np.ones(12, bool)
    others[v2] = False
    np.testing.assert_array_equal(uv[others][~lost[others]], record.samples[others][~lost[others]])
    assert np.abs(uv[v2][~lost[v2]] - record.samples[v2][~lost[v2]]).max() <= step[v2] / 2
    assert raw[v2][~lost[v2]].min() > PADDING_VALUE  # no received sample looks lost


def test_measurements_are_annotations_with_their_codes_and_units(json_record):
    ds = read(encode_ecg(json_record, None, equipment=EQUIPMENT))
    got = numeric_annotations(ds)
    assert got == {
        ("MDC", "2:16016"): (68.6, "/min"),
        ("MDC", "2:16168"): (875.0, "ms"),
        ("MDC", "2:15872"): (158.0, "ms"),
        ("MDC", "2:16156"): (94.0, "ms"),
        ("MDC", "2:16160"): (392.0, "ms"),
        ("MDC", "2:15880"): (419.1, "ms"),
        ("MDC", "2:15892"): (410.0, "ms"),
        ("MDC", "2:16128"): (52.0, "deg"),
        ("MDC", "2:16132"): (-12.0, "deg"),
    }
    # every value read back equals the JSON's measurement of the same name
    by_code = {(s, c): key for key, (s, c, _, _) in dicom.MEASUREMENT_CODES.items()}
    for code, (value, _) in got.items():
        assert value == json_record.measurements[by_code[code]]


def test_no_measurements_means_no_annotation_module(json_record):
    bare = dataclasses.replace(json_record, measurements={"heart_rate_bpm": None,
                                                          "qt_ms": float("nan")})
    assert "WaveformAnnotationSequence" not in read(encode_ecg(bare, None, equipment=EQUIPMENT))


def test_the_older_rr_mean_ms_key_is_the_rr_interval(json_record):
    older = dataclasses.replace(json_record, measurements={"heart_rate_bpm": 70.0,
                                                           "rr_mean_ms": 857})
    got = numeric_annotations(read(encode_ecg(older, None, equipment=EQUIPMENT)))
    assert got == {("MDC", "2:16016"): (70.0, "/min"), ("MDC", "2:16168"): (857.0, "ms")}


def test_patient_module_holds_what_the_block_gives(json_record):
    ds = read(encode_ecg(json_record, PATIENT, equipment=EQUIPMENT))
    assert ds.PatientName.family_name == "Synthetica"
    assert ds.PatientName.given_name == "Testa"
    assert ds.PatientID == "SYN-0001"
    assert ds.PatientBirthDate == "19670314"
    assert ds.PatientSex == "F"
    assert ds.PatientAge == "059Y"
    assert ds.ReferringPhysicianName.family_name == "Dr Example"
    assert ds.InstitutionName == "Test Clinic"
    assert "SpecificCharacterSet" not in ds  # all ASCII: the default repertoire


def test_patient_module_holds_only_what_was_given(json_record):
    ds = read(encode_ecg(json_record, {"patient_name": "Testa Synthetica", "gender": "male"},
                         equipment=EQUIPMENT))
    assert str(ds.PatientName) == "Testa Synthetica^"  # free text kept whole
    assert ds.PatientSex == "M"
    # type 2: present and empty; type 3: absent
    for keyword in ("PatientID", "PatientBirthDate", "ReferringPhysicianName"):
        assert keyword in ds and ds[keyword].value in ("", None), keyword
    for keyword in ("PatientAge", "InstitutionName", "PatientWeight", "PatientComments"):
        assert keyword not in ds, keyword


def test_no_patient_block_gives_empty_type_2_attributes(json_record):
    ds = read(encode_ecg(json_record, None, equipment=EQUIPMENT))
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        assert keyword in ds and ds[keyword].value in ("", None), keyword
    assert "PatientAge" not in ds


def test_unusable_patient_values_are_left_out_not_guessed(json_record):
    odd = {"first_name": "Testa", "dob": "14/03/1967", "gender": "unknown", "age": ""}
    ds = read(encode_ecg(json_record, odd, equipment=EQUIPMENT))
    assert ds.PatientName.given_name == "Testa" and ds.PatientName.family_name == ""
    assert ds.PatientBirthDate == "" and ds.PatientSex == "" and "PatientAge" not in ds


def test_non_ascii_names_are_written_in_utf8_and_delimiters_are_not_taken_as_structure(
    json_record,
):
    patient = {"first_name": "Zoë", "last_name": "Ñúñez^Test", "patient_id": "A\\B"}
    ds = read(encode_ecg(json_record, patient, equipment=EQUIPMENT))
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.PatientName.family_name == "Ñúñez Test"
    assert ds.PatientName.given_name == "Zoë"
    assert ds.PatientID == "A B"


def test_a_non_ascii_institution_or_manufacturer_also_selects_utf8(json_record):
    ds = read(encode_ecg(json_record, {"Org.": "Clínica de Prueba"},
                         equipment=Equipment("Médica GmbH")))
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.InstitutionName == "Clínica de Prueba" and ds.Manufacturer == "Médica GmbH"


def test_over_long_text_is_cut_to_the_vr_limit(json_record):
    ds = read(encode_ecg(json_record, {"last_name": "X" * 100, "patient_id": "7" * 80,
                                       "doctor": "D" * 200}, equipment=EQUIPMENT))
    assert ds.PatientName.family_name == "X" * 63  # 64 with the "^"
    assert ds.PatientID == "7" * 64
    assert ds.ReferringPhysicianName.family_name == "D" * 63
    both = read(encode_ecg(json_record, {"last_name": "L" * 50, "first_name": "F" * 50},
                           equipment=EQUIPMENT))
    assert len(str(both.PatientName)) == 64
    assert both.PatientName.family_name == "L" * 32 and both.PatientName.given_name == "F" * 31


def test_equipment_module(json_record):
    ds = read(encode_ecg(json_record, None, equipment=EQUIPMENT))
    assert ds.Manufacturer == "Example Medical"
    assert ds.ManufacturerModelName == "ECG12-PI"
    assert ds.DeviceSerialNumber == "SN-0042"
    assert ds.SoftwareVersions == "0.1.0"
    bare = read(encode_ecg(json_record, None, equipment=Equipment()))
    assert bare.Manufacturer == ""
    assert "DeviceSerialNumber" not in bare and "ManufacturerModelName" not in bare


def test_equipment_of_a_device_leaves_out_unknown_fields():
    assert Equipment.of(DeviceInfo("SN-1", "unknown", "0.2.0"), manufacturer="M") == Equipment(
        "M", None, "SN-1", "0.2.0")
    assert Equipment.of(DeviceInfo()) == Equipment()


def test_filters_given_are_written_on_every_channel(json_record):
    filters = DisplayFilter(highpass_hz=0.05, lowpass_hz=150.0, notch_hz=50.0)
    ds = read(encode_ecg(json_record, None, equipment=EQUIPMENT, filters=filters))
    for ch in ds.WaveformSequence[0].ChannelDefinitionSequence:
        assert float(ch.FilterLowFrequency) == 0.05
        assert float(ch.FilterHighFrequency) == 150.0
        assert float(ch.NotchFilterFrequency) == 50.0
    only_notch = read(encode_ecg(json_record, None, equipment=EQUIPMENT,
                                 filters=DisplayFilter(notch_hz=60.0)))
    ch = only_notch.WaveformSequence[0].ChannelDefinitionSequence[0]
    assert float(ch.NotchFilterFrequency) == 60.0 and "FilterLowFrequency" not in ch


def test_dates_come_from_acquired_at_with_its_utc_offset(json_record):
    ds = read(encode_ecg(json_record, None, equipment=EQUIPMENT))
    assert (ds.StudyDate, ds.StudyTime) == ("20261127", "093005")
    assert (ds.ContentDate, ds.ContentTime) == ("20261127", "093005")
    assert ds.AcquisitionDateTime == "20261127093005+0100"
    assert ds.TimezoneOffsetFromUTC == "+0100"

    west = dataclasses.replace(
        json_record,
        acquired_at=datetime(2026, 1, 2, 23, 59, 58, 250000, tzinfo=timezone(-timedelta(hours=5,
                                                                                       minutes=30))),
    )
    ds = read(encode_ecg(west, None, equipment=EQUIPMENT))
    assert ds.ContentTime == "235958.250000"
    assert ds.AcquisitionDateTime == "20260102235958.250000-0530"
    assert ds.TimezoneOffsetFromUTC == "-0530"

    naive = dataclasses.replace(json_record, acquired_at=datetime(2026, 1, 2, 8, 0, 0))
    ds = read(encode_ecg(naive, None, equipment=EQUIPMENT))
    assert ds.AcquisitionDateTime == "20260102080000" and "TimezoneOffsetFromUTC" not in ds


def test_re_encoding_is_byte_identical_and_uids_follow_the_record(json_record):
    first = encode_ecg(json_record, PATIENT, equipment=EQUIPMENT)
    assert encode_ecg(json_record, PATIENT, equipment=EQUIPMENT) == first
    again = ecgdata.loads(ecgdata.dumps(json_record))  # a new object from the same JSON
    assert encode_ecg(again, PATIENT, equipment=EQUIPMENT) == first

    ds = read(first)
    uids = {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    assert len(uids) == 3
    assert all(uid.startswith("2.25.") and len(uid) <= 64 and uid.is_valid for uid in uids)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID

    other = read(encode_ecg(dataclasses.replace(json_record, record_id="another-record"),
                            PATIENT, equipment=EQUIPMENT))
    assert uids.isdisjoint({other.StudyInstanceUID, other.SeriesInstanceUID,
                            other.SOPInstanceUID})


def test_a_record_without_id_still_re_encodes_identically(json_record):
    anonymous = dataclasses.replace(json_record, record_id=None)
    first = encode_ecg(anonymous, None, equipment=EQUIPMENT)
    copy = ecgdata.loads(ecgdata.dumps(anonymous))  # equal record, another object
    assert copy.record_id is None
    assert encode_ecg(copy, None, equipment=EQUIPMENT) == first
    changed = anonymous.samples.copy()
    changed[0, 0] += 1
    other = encode_ecg(dataclasses.replace(anonymous, samples=changed), None,
                       equipment=EQUIPMENT)
    assert read(other).SOPInstanceUID != read(first).SOPInstanceUID


def test_uid_root_is_used_and_checked(json_record):
    root = "1.2.826.0.1.3680043.10.999."
    ds = read(encode_ecg(json_record, None, equipment=EQUIPMENT, uid_root=root))
    for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
        assert uid.startswith(root) and len(uid) <= 64 and uid.is_valid
    for bad in ("2.25", "2.25.01.", "abc.", "1." * 30):
        with pytest.raises(ValueError, match="UID root"):
            encode_ecg(json_record, None, equipment=EQUIPMENT, uid_root=bad)


def test_1000_hz_record(ecg_data_dir):
    record = with_losses(to_record(ecg_data_dir / "s0010_re", seconds=10, acquired_at=AT,
                                   record_id=RECORD_ID))
    record = ecgdata.loads(ecgdata.dumps(record))
    ds = read(encode_ecg(record, None, equipment=EQUIPMENT))
    group = ds.WaveformSequence[0]
    assert float(group.SamplingFrequency) == 1000 and group.NumberOfWaveformSamples == 10000
    raw, step, uv = stored_and_uv(ds)
    np.testing.assert_array_equal(step, 1.0)
    np.testing.assert_array_equal(raw == PADDING_VALUE, record.missing)
    np.testing.assert_array_equal(uv[~record.missing], record.samples[~record.missing])


@pytest.mark.parametrize("rate", [100, 2000])
def test_a_rate_outside_the_iod_is_refused(json_record, rate):
    record = dataclasses.replace(json_record, sampling_rate=rate)
    with pytest.raises(ValueError, match=f"{rate} Hz.*200-1000 Hz"):
        encode_ecg(record, None, equipment=EQUIPMENT)


def test_too_many_samples_or_other_leads_are_refused(json_record):
    long = dataclasses.replace(json_record, samples=np.zeros((12, 20000), np.int32),
                               missing=np.zeros((12, 20000), bool))
    with pytest.raises(ValueError, match="20000 samples"):
        encode_ecg(long, None, equipment=EQUIPMENT)
    eight = dataclasses.replace(json_record, lead_names=tuple(reversed(LEAD_ORDER)))
    with pytest.raises(ValueError, match="needs exactly"):
        encode_ecg(eight, None, equipment=EQUIPMENT)


def test_quantise_rounds_half_away_from_zero_and_pads_lost_samples():
    samples = np.array([[0, 32767, -32767, 5, -5],
                        [65535, -65535, 3, -3, 0],
                        [40000, 1, -1, 2, -2]], np.int32)
    missing = np.zeros(samples.shape, bool)
    missing[2, 4] = True
    stored, step = dicom.quantise(samples, missing)
    assert step.tolist() == [1, 3, 2]
    assert stored[0].tolist() == [0, 32767, -32767, 5, -5]
    assert stored[1].tolist() == [21845, -21845, 1, -1, 0]
    assert stored[2].tolist() == [20000, 1, -1, 1, PADDING_VALUE]


def test_build_dataset_is_what_encode_ecg_writes(json_record):
    ds = dicom.build_dataset(json_record, PATIENT, equipment=EQUIPMENT)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    assert out.getvalue() == encode_ecg(json_record, PATIENT, equipment=EQUIPMENT)
