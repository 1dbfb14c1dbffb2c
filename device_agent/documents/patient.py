"""The patient block of a capture request: read bounded, checked for types and lengths.

Policy: the known keys (KNOWN_KEYS: what the legacy app writes, and a few aliases) are
type- and length-checked; other keys are kept as given if they are short scalars (a field a
newer front end adds must not cost a patient's ECG), nested values and oversized blocks are
refused. A file with an unknown key gets one warning naming the closest known key, as .env
does (`{"nmae": ...}`: did you mean `name`?). Every text value passes the one Unicode gate
(device_agent.core.text): a lone surrogate is refused here, before the board is touched.
`record_id` and `acquired_at` are ours. Errors name the field and what is wrong, never the
value (it may be the patient's name). Stdlib only: `capture` checks the file before it
hands the request to the service.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from device_agent.core.errors import NotUnicodeText, PatientDetailsError
from device_agent.core.fsutil import FileTooLarge, NotRegularFile, read_regular
from device_agent.core.text import checked, closest

log = logging.getLogger(__name__)

MAX_BYTES = 64 * 1024  # a patient block is a few hundred bytes; this is generous
# Every key the agent reads, with its length limit: the legacy app's (recording.py writes
# first_name, last_name, patient_name, age as text, gender, doctor, doctor_mobile, Org.,
# date_time; all_patients.json adds id; its report index writes name), then aliases.
_TEXT_KEYS = {"first_name": 100, "last_name": 100, "patient_name": 200, "name": 200,
              "gender": 20, "sex": 20, "doctor": 200, "doctor_mobile": 64, "Org.": 200,
              "date_time": 40, "patient_id": 64, "id": 64, "dob": 10, "date_of_birth": 10}
KNOWN_KEYS = ("age", *_TEXT_KEYS)
_MAX_EXTRA_KEYS = 32
_MAX_TEXT = 500
_KEY_RE = re.compile(r"^[A-Za-z0-9 ._-]{1,64}$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def read_patient(path: Path | None) -> dict[str, Any] | None:
    """The patient file's JSON object, read with a size bound and never through a link."""
    if path is None:
        return None
    try:
        raw = read_regular(path, max_bytes=MAX_BYTES)
    except FileTooLarge:
        raise PatientDetailsError(f"patient details {path} is larger than {MAX_BYTES // 1024} "
                                  "KiB: pass the patient block only") from None
    except NotRegularFile as exc:
        raise PatientDetailsError(f"patient details {path} is {exc.strerror}: pass a "
                                  "regular JSON file") from None
    except OSError as exc:
        raise PatientDetailsError(f"cannot read patient details {path}: {exc.strerror}; "
                                  "check the path") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise PatientDetailsError(f"patient details {path} is not valid UTF-8 JSON; pass a "
                                  "JSON object file") from None
    if not isinstance(doc, dict):
        raise PatientDetailsError(f"patient details {path} holds a JSON "
                                  f"{type(doc).__name__}, not an object")
    for key in doc:
        if key not in KNOWN_KEYS and key not in ("record_id", "acquired_at") and _KEY_RE.match(
                key):
            guess = closest(key, KNOWN_KEYS)
            hint = (f"did you mean {guess!r}?" if guess
                    else "the known keys are " + ", ".join(KNOWN_KEYS))
            log.warning("patient details %s: unknown key %r is kept in patient_details but "
                        "printed nowhere; %s", path, key, hint)
    return doc


def validate_patient(patient: Mapping[str, Any] | None) -> dict[str, Any]:
    """The patient block checked for types and lengths; raises PatientDetailsError."""
    if patient is None:
        return {}
    if not isinstance(patient, Mapping):
        raise PatientDetailsError(f"patient details must be a JSON object, got "
                                  f"{type(patient).__name__}; fix the capture request")
    out: dict[str, Any] = {}
    extra = 0
    for key, value in patient.items():
        if key in ("record_id", "acquired_at"):
            continue  # ours, set from the record; a stale copy from the front end is dropped
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise PatientDetailsError("a patient details key is not 1-64 letters, digits, "
                                      "space . _ -; fix the capture request")
        if key == "age":
            out[key] = _age(value)
            continue
        if key in ("dob", "date_of_birth") and value not in (None, "") and (
                not isinstance(value, str) or not _DATE_RE.match(value)):
            raise PatientDetailsError(f"patient details field {key!r} must be a date "
                                          "YYYY-MM-DD")
        if key in ("id", "patient_id") and isinstance(value, int) and not isinstance(
                value, bool):
            out[key] = value  # all_patients.json numbers its patients
            continue
        if key in _TEXT_KEYS:
            limit = _TEXT_KEYS[key]
        else:
            extra += 1
            limit = _MAX_TEXT
            if extra > _MAX_EXTRA_KEYS:
                raise PatientDetailsError(f"patient details have more than {_MAX_EXTRA_KEYS} "
                                          "unknown keys; send only the patient block")
            if value is None or isinstance(value, bool | int | float):
                out[key] = value
                continue
        if value is None:
            out[key] = ""
            continue
        if not isinstance(value, str):
            raise PatientDetailsError(f"patient details field {key!r} must be text, got "
                                      f"{type(value).__name__}")
        try:
            checked(value, f"patient details field {key!r}")
        except NotUnicodeText as exc:
            raise PatientDetailsError(f"{exc} (the capture was not started)") from exc
        if len(value) > limit:
            raise PatientDetailsError(f"patient details field {key!r} is {len(value)} "
                                      f"characters; at most {limit}")
        out[key] = value
    return out


def _age(value: Any) -> int | str:
    # The legacy front end sends age as text ("45" or ""); keep its form, check the range.
    if value is None or value == "":
        return ""
    ok_type = isinstance(value, str | int) and not isinstance(value, bool)
    text = str(value).strip() if ok_type else ""
    # isdecimal, not isdigit: "²" or "⑤" are digits int() cannot read (a ValueError that
    # escaped as "unexpected error"); decimal digits of any script ("١٥٠") are numbers
    if not text.isdecimal() or not 0 <= int(text) <= 150:
        raise PatientDetailsError("patient details field 'age' must be a whole number 0-150")
    return value if isinstance(value, int) else text
