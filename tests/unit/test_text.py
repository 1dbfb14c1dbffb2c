"""The one Unicode gate (device_agent.core.text) at every edge, and the one "did you mean"."""

from __future__ import annotations

import json
import logging

import pytest

from device_agent.commands import main
from device_agent.core import text
from device_agent.core.config import closest_key, load_settings
from device_agent.core.errors import ConfigError, NotUnicodeText, PatientDetailsError
from device_agent.documents.patient import KNOWN_KEYS, read_patient, validate_patient
from tests.conftest import REPO

LONE = "\ud800x"  # what json.loads makes of "\ud800x"


def test_checked_passes_valid_text_unchanged_and_refuses_a_lone_surrogate():
    for value in ("", "José", "Jose\u0301", "דוד", "\U0001f600", "\ufffe"):
        assert text.checked(value, "f") is value
    for value in (LONE, "\udcff", "a\udfffb"):
        with pytest.raises(NotUnicodeText, match="field f holds a lone surrogate"):
            text.checked(value, "field f")
    assert text.checked_tree({"a": [1, "b", {"c": None}]}, "x") == {"a": [1, "b", {"c": None}]}
    with pytest.raises(NotUnicodeText):
        text.checked_tree({"a": [1, {"c": LONE}]}, "x")
    with pytest.raises(NotUnicodeText):
        text.checked_tree({LONE: 1}, "x")


def test_a_lone_surrogate_in_a_patient_field_is_refused_before_the_capture(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"first_name": "\\ud800x", "age": "40"}')  # valid JSON, invalid text
    patient = read_patient(path)
    with pytest.raises(PatientDetailsError, match="'first_name' holds a lone surrogate") as exc:
        validate_patient(patient)
    assert "\n" not in str(exc.value) and "\ud800" not in str(exc.value)


def test_a_setting_that_is_not_unicode_is_a_config_error_naming_the_key(capsys):
    with pytest.raises(ConfigError, match=r"DEVICE_MODEL \(from environment\) holds a lone"):
        load_settings(environ={"DEVICE_MODEL": "ECG\udcff"})
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY"):
        load_settings(environ={"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s\udcff"})
    # through the CLI: exit 2, one line (the old code failed only when a PDF was written)
    assert main(["--set", "DEVICE_MANUFACTURER=Synth\udce9tic", "config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DEVICE_MANUFACTURER" in err[0]


def test_closest_is_the_one_did_you_mean_for_settings_and_patient_keys():
    assert closest_key("AWS_S3_BUKET") == "AWS_S3_BUCKET"
    assert closest_key("aws_s3_bucket") == "AWS_S3_BUCKET"
    assert text.closest("org", KNOWN_KEYS) == "Org."
    assert text.closest("firstname", KNOWN_KEYS) == "first_name"
    assert text.closest("weight_kg", KNOWN_KEYS) is None


def test_an_unknown_patient_key_is_warned_about_with_the_closest_known_one(tmp_path, caplog):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"nmae": "Synthetic", "gendr": "F", "weight_kg": 70}))
    with caplog.at_level(logging.WARNING, logger="device_agent.documents.patient"):
        patient = read_patient(path)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "unknown key 'nmae'" in lines[0] and "did you mean 'name'?" in lines[0]
    assert "did you mean 'gender'?" in lines[1]
    assert "the known keys are" in lines[2]
    assert all("Synthetic" not in line for line in lines), "never the value"
    assert validate_patient(patient)["nmae"] == "Synthetic", "kept, not lost"


def test_the_legacy_patient_file_is_all_known_keys_and_passes(tmp_path, caplog):
    path = REPO / "tests" / "data" / "legacy" / "patient_details.json"
    with caplog.at_level(logging.WARNING, logger="device_agent.documents.patient"):
        patient = validate_patient(read_patient(path))
    assert caplog.records == []
    assert patient == json.loads(path.read_text())
