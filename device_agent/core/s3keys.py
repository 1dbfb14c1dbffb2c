"""S3 key naming and object metadata: pure functions, exactly the layout consumers rely on.

See docs/s3-layout.md. Every key lives under `ecg-reports/` and
derives from the record's (or report's, or user's) own time, never the upload time, so a
retry tomorrow produces the same key as today's attempt.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from datetime import datetime
from urllib.parse import quote

from device_agent.core.text import text_problem

PREFIX = "ecg-reports"
KINDS = (
    "ecg_report_pdf",
    "patient_details",
    "ecg_12lead_data",
    "ecg_dicom",
    "manifest",
    "user_signup",
    "report_json",
)
CONTENT_TYPES = {".pdf": "application/pdf", ".json": "application/json",
                 ".dcm": "application/dicom"}
USERNAME_MAX = 64

_DATE_PREFIX_RE = re.compile(r"^\d{4}/\d{2}/\d{2}$")
_STAMP_RE = re.compile(r"^\d{8}_\d{6}$")
# A stamp anywhere in a report's name, not inside a longer run of digits.
_NAME_STAMP_RE = re.compile(r"(?<!\d)(\d{8}_\d{6})(?!\d)")
_TAGGED_RE = re.compile(r"-[0-9a-f]{12}$")  # the tag safe_username adds
EARLIEST_YEAR = 2000  # no report or user of this unit is older; a date before is not one
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9._-]+")
_DOTS_RE = re.compile(r"\.{2,}")
_PRINTABLE_ASCII = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
# Names the agent itself gives files: they carry no identity, so logs and metadata may show
# them. Any other name (a dropped report called after its patient, a username) is hashed.
_OWN_NAME_RE = re.compile(
    r"^(ECG_Report|ecg_data|patient_details|manifest|ECG)_\d{8}_\d{6}(__[0-9a-f]{12})?"
    r"\.(pdf|json|dcm)$")


def date_prefix(when: datetime) -> str:
    """`YYYY/MM/DD` of a timestamp, in the timestamp's own time zone; always 4-digit years
    (strftime's %Y gives `1` for the year 1 on glibc)."""
    return f"{when.year:04d}/{when.month:02d}/{when.day:02d}"


def stamp(when: datetime) -> str:
    """`YYYYMMDD_HHMMSS` of a timestamp, as the legacy app named files."""
    return (f"{when.year:04d}{when.month:02d}{when.day:02d}_"
            f"{when.hour:02d}{when.minute:02d}{when.second:02d}")


def content_type(name: str) -> str:
    """The Content-Type of a file or key by its extension (the one table)."""
    dot = name.rfind(".")
    return CONTENT_TYPES.get(name[dot:].lower() if dot >= 0 else "", "application/octet-stream")


def display_name(name: str) -> str:
    """A file name as logs and errors may show it: the agent's own names as they are, any
    other (which may carry a patient's or user's name) as `name#<sha256[:12]>`."""
    if _OWN_NAME_RE.match(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"name#{digest}"


def display_key(key: str) -> str:
    """An S3 key or a local path as a person or a log may see it: its folders as they are
    (dates and stamps), its last part through display_name (`.../name#<sha256[:12]>`)."""
    folder, slash, name = str(key).rpartition("/")
    return f"{folder}{slash}{display_name(name)}"


def key_problem(filename: str) -> str | None:
    """Why a file name cannot be part of an S3 key (None when it can)."""
    if not filename or filename in (".", ".."):
        return "an empty or dot name"
    if "/" in filename or "\\" in filename:
        return "a slash or backslash in the name"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in filename):
        return "a control character (newline, tab) in the name"
    if text_problem(filename):  # the one Unicode gate (device_agent.core.text)
        return "bytes that are not UTF-8 in the name"
    if len(filename.encode("utf-8")) > 255:
        return "a name longer than 255 bytes"
    return None


def _check_filename(filename: str) -> str:
    problem = key_problem(filename)
    if problem:
        raise ValueError(f"file name {display_name(filename)} cannot be part of an S3 key: "
                         f"{problem}")
    return filename


def package_key(date_prefix: str, stamp: str, filename: str) -> str:
    """`ecg-reports/{YYYY}/{MM}/{DD}/{stamp}/{filename}`: one file of a complete package."""
    if not _DATE_PREFIX_RE.match(date_prefix):
        raise ValueError(f"date prefix {date_prefix!r} is not YYYY/MM/DD")
    if not _STAMP_RE.match(stamp):
        raise ValueError(f"stamp {stamp!r} is not YYYYMMDD_HHMMSS")
    return f"{PREFIX}/{date_prefix}/{stamp}/{_check_filename(filename)}"


def stamp_date(text: str) -> datetime | None:
    """The time of a `YYYYMMDD_HHMMSS` stamp, or None when it is not a real date from
    EARLIEST_YEAR on (`00010101_...` and `09991231_...` are not this unit's data)."""
    try:
        when = datetime.strptime(text, "%Y%m%d_%H%M%S")
    except ValueError:
        return None
    return when if when.year >= EARLIEST_YEAR else None


def report_dating(filename: str, mtime: datetime | None) -> tuple[datetime, str | None]:
    """A report's own date, and a note when its name's stamp could not be used.

    The date is the first `YYYYMMDD_HHMMSS` in the name (`ECG_Report_{stamp}.pdf`; the
    legacy 12-lead screen's `ECG_Report_12_1_{stamp}.pdf`; its `..._{stamp}_1.pdf` when a
    name was taken), else the file's mtime. ValueError when neither gives a date from
    EARLIEST_YEAR on: a key is always `YYYY/MM/DD` with a 4-digit year.
    """
    note = None
    match = _NAME_STAMP_RE.search(filename)
    if match:
        when = stamp_date(match.group(1))
        if when is not None:
            return when, None
        note = (f"the stamp {match.group(1)} in its name is not a date from {EARLIEST_YEAR} "
                "on; dated by its modification time")
    if mtime is None or mtime.year < EARLIEST_YEAR:
        raise ValueError(f"neither its name nor its modification time gives a date from "
                         f"{EARLIEST_YEAR} on; rename it ECG_Report_YYYYMMDD_HHMMSS.pdf "
                         "or set its time (touch)")
    return mtime, note


def report_date(filename: str, mtime: datetime | None) -> datetime:
    """A report's own date (see report_dating)."""
    return report_dating(filename, mtime)[0]


def report_key(filename: str, mtime: datetime | None) -> str:
    """`ecg-reports/{YYYY}/{MM}/{DD}/{filename}` for a simple report upload (PDF or .json twin)."""
    when = report_date(filename, mtime)
    return f"{PREFIX}/{date_prefix(when)}/{_check_filename(filename)}"


def safe_username(name: str) -> str:
    """A key-safe, deterministic, non-empty form of a username, injective in the username.

    A name already safe (only A-Z a-z 0-9 . _ -, not only punctuation, at most
    USERNAME_MAX, no `..`, no leading dot) is kept as it is, as the legacy app keyed it.
    Any other name is cleaned (accents folded, the rest to `_`, cut) and gets
    `-{sha256(name)[:12]}`: `José` and `Jose`, or `a/b`, `a_b` and `a b`, never share a key
    (or a local file). A safe name that itself ends like such a tag is tagged too, so a
    kept name never equals a tagged one.
    """
    raw = str(name)
    folded = unicodedata.normalize("NFKD", raw)
    ascii_only = "".join(ch for ch in folded if not unicodedata.combining(ch)).encode(
        "ascii", "ignore"
    ).decode("ascii")
    safe = _DOTS_RE.sub(".", _UNSAFE_RE.sub("_", ascii_only)).lstrip(".")
    if (safe == raw and len(safe) <= USERNAME_MAX and safe.strip("_.-")
            and not _TAGGED_RE.search(safe)):
        return safe
    digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    # Nothing recognisable survived (e.g. a name in a non-Latin script): `user-{digest}`.
    base = safe[:USERNAME_MAX - 13] if safe.strip("_.-") else "user"
    return f"{base}-{digest}"


def signup_key(username: str, registered_at: datetime) -> str:
    """`ecg-reports/{YYYY}/{MM}/{DD}/user_signup_{safe}_{YYYYMMDD_HHMMSS}.json`."""
    return (
        f"{PREFIX}/{date_prefix(registered_at)}/"
        f"user_signup_{safe_username(username)}_{stamp(registered_at)}.json"
    )


def disambiguated_key(key: str, sha256: str) -> str:
    """Where a different file that collided with `key` is kept: `name__{sha[:12]}.ext`."""
    if not re.fullmatch(r"[0-9a-f]{12,64}", sha256):
        raise ValueError(f"sha256 {sha256!r} is not a hex digest")
    folder, slash, name = key.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    tagged = f"{stem}__{sha256[:12]}" + (f".{ext}" if ext else "")
    return f"{folder}{slash}{tagged}"


def _ascii_safe(value: str) -> str:
    """S3 user metadata travels as HTTP headers: keep printable ASCII, percent-encode the rest."""
    return quote(value, safe=_PRINTABLE_ASCII)


def object_metadata(
    kind: str,
    filename: str,
    *,
    uploaded_at: datetime | str,
    record_id: str | None = None,
    device_serial: str | None = None,
    sha256: str,
) -> dict[str, str]:
    """The object's user metadata: what it is and where from, never who it is about."""
    if kind not in KINDS:
        raise ValueError(f"object type {kind!r} is not one of {', '.join(KINDS)}")
    when = uploaded_at.isoformat() if isinstance(uploaded_at, datetime) else str(uploaded_at)
    meta = {
        "type": kind,
        "uploaded_at": when,
        "filename": display_name(filename),
        "sha256": sha256,
    }
    if record_id:
        meta["record-id"] = record_id
    if device_serial:
        meta["device-serial"] = device_serial
    return {key: _ascii_safe(value) for key, value in meta.items()}
