"""One isolated unit per generated example, driven through the real CLI, and the invariants
every run is checked against (issue 22's systemic part).

A `Unit` is a fresh temporary folder (state, reports, users.json, its own cwd so no stray
`.env` is read) and a fresh bucket on the session's moto HTTP server; `run` starts
`python -m device_agent ...` as a subprocess, the way an operator or systemd does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import boto3

# Exit codes the README documents, the same for every command.
DOCUMENTED_CODES = {0, 1, 2, 3, 4, 130}
# A key of a dropped report or a signup: ecg-reports/YYYY/MM/DD/<one name>; of a package:
# ecg-reports/YYYY/MM/DD/YYYYMMDD_HHMMSS/<one name> (docs/s3-layout.md).
KEY_RE = re.compile(r"^ecg-reports/(\d{4})/(\d{2})/(\d{2})/(?:(\d{8}_\d{6})/)?([^/]+)$")
SIGNUP_RE = re.compile(r"^user_signup_([A-Za-z0-9._-]{1,64})_(\d{8})_(\d{6})\.json$")
SIGNUP_FIELDS = ["username", "full_name", "phone", "serial_id", "email", "age", "gender",
                 "registration_date", "last_sync", "uploaded_at"]
CRASH_MARKERS = ("Traceback (most recent call last)", "unexpected error",
                 "Exception in thread", "PytestUnhandled")
_S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class Run:
    argv: list[str]
    rc: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err

    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    def __str__(self) -> str:
        return f"$ device-agent {' '.join(self.argv)}\nrc={self.rc}\n{self.out}{self.err}"


@dataclass
class Unit:
    endpoint: str
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="props-")))
    bucket: str = field(default_factory=lambda: f"props-{uuid.uuid4().hex[:16]}")
    settings: dict[str, str] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing")
        self.client.create_bucket(Bucket=self.bucket)
        self.state = self.root / "state"
        self.reports = self.root / "reports"
        self.users_file = self.root / "users.json"
        self.base = {"STATE_DIR": str(self.state), "REPORTS_DIR": str(self.reports),
                     "USERS_FILE": str(self.users_file), "CLOCK_CHECK": "floor",
                     "DISK_RESERVE_MB": "0", "AWS_S3_BUCKET": self.bucket,
                     "AWS_S3_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": self.endpoint}

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Unit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flags(self, **extra: str) -> list[str]:
        values = {**self.base, **self.settings, **extra}
        return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]

    def run(self, *argv: str, flags: Iterable[str] | None = None,
            env: Mapping[str, str] | None = None, timeout: float = 120) -> Run:
        """`python -m device_agent [flags] argv` in the unit's own folder."""
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(("AWS_", "ECG_", "S3_", "DEVICE_", "REPORT"))}
        environ.update(_S3_ENV)
        environ.update(env or {})
        args = [*(self.flags() if flags is None else flags), *argv]
        proc = subprocess.run([sys.executable, "-m", "device_agent", *args], cwd=self.root,
                              env=environ, capture_output=True, timeout=timeout)
        run = Run(list(argv), proc.returncode, proc.stdout.decode("utf-8", "replace"),
                  proc.stderr.decode("utf-8", "replace"))
        self.runs.append(run)
        return run

    def objects(self) -> dict[str, bytes]:
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return {k: self.client.get_object(Bucket=self.bucket, Key=k)["Body"].read()
                for k in keys}

    def metadata(self) -> dict[str, dict[str, str]]:
        return {k: self.client.head_object(Bucket=self.bucket, Key=k)["Metadata"]
                for k in self.objects()}


# --- invariants -------------------------------------------------------------------------

def assert_clean(run: Run, codes: Iterable[int] = DOCUMENTED_CODES) -> None:
    """No traceback, no unhandled exception turned into 'unexpected error', a documented code."""
    for marker in CRASH_MARKERS:
        assert marker not in run.text, f"{marker!r} in the output of\n{run}"
    assert run.rc in set(codes), f"exit code {run.rc} not in {sorted(set(codes))}:\n{run}"


def assert_keys_in_layout(keys: Iterable[str]) -> None:
    """Every key under ecg-reports/YYYY/MM/DD/ with a real date, 4-digit year, from 2000."""
    for key in keys:
        m = KEY_RE.match(key)
        assert m, f"key outside ecg-reports/YYYY/MM/DD/: {key!r}"
        year, month, day = (int(g) for g in m.group(1, 2, 3))
        when = datetime(year, month, day)  # raises for 2026/02/30
        assert year >= 2000, key
        if m.group(4):
            assert m.group(4)[:8] == when.strftime("%Y%m%d"), key
        name = m.group(5)
        assert name not in (".", "..") and "\\" not in name, key
        assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in key), key
        assert len(key.encode("utf-8")) <= 1024, key


def encodings(value: str) -> set[str]:
    """The raw string and the forms it would take in a log, JSON, a header or a key."""
    forms = {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1],
             repr(value)[1:-1], quote(value.encode("utf-8", "surrogatepass")),
             quote(value.encode("utf-8", "surrogatepass"), safe="")}
    folded = "".join(c for c in unicodedata.normalize("NFKD", value)
                     if not unicodedata.combining(c)).encode("ascii", "ignore").decode()
    forms.add(re.sub(r"[^A-Za-z0-9._-]+", "_", folded))  # the cleaned form of a key
    return {f for f in forms if distinctive(f)}


def distinctive(text: str) -> bool:
    """Long and odd enough that finding it in a log is not chance: 6+ characters, not only
    digits, hex, spaces and separators (stamps and digests are everywhere)."""
    core = text.strip()
    return len(core) >= 6 and not re.fullmatch(r"[0-9a-fA-F_ .:\-/+\\%]*", core)


def assert_not_shown(secrets: Iterable[str], where: Mapping[str, str]) -> None:
    """None of `secrets` (identities: patient or user names, phones, emails) in any of
    `where` (what -> text), in any obvious encoding."""
    for secret in secrets:
        if not isinstance(secret, str):
            continue
        for form in encodings(secret):
            for what, text in where.items():
                assert form not in text, f"identity {secret!r} (as {form!r}) shown in {what}"


def operator_views(unit: Unit) -> list[Run]:
    """What an operator asks for after the passes: `status`, `queue list --all` as text and
    --json (the plain list is a part of it) and `verify --json` (1 when something is
    missing). Each must end cleanly; their output then joins `shown_texts` (issue 22 item 6).
    Plain `verify` prints only what is missing: tests/functional/test_identity_shown.py."""
    views = [unit.run("status"), unit.run("queue", "list", "--all"),
             unit.run("queue", "list", "--all", "--json"), unit.run("verify", "--json")]
    for view in views:
        assert_clean(view, codes={0, 1} if view.argv[0] in ("status", "verify") else {0})
    for view in views:
        if "--json" in view.argv:
            json.loads(view.out)  # machine-readable whatever the names were
    return views


def shown_texts(unit: Unit, *, metadata: bool = True) -> dict[str, str]:
    """Everything a person or a log sees: each run's output, status.json, S3 metadata."""
    where = {f"output of `{' '.join(r.argv)}` (run {i})": r.text for i, r in enumerate(unit.runs)}
    status = unit.state / "status.json"
    if status.exists():
        where["status.json"] = status.read_text(errors="replace")
    if metadata:
        for key, meta in unit.metadata().items():
            where[f"metadata of {key}"] = json.dumps(meta, ensure_ascii=False)
    return where
