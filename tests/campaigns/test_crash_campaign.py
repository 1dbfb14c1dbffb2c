"""Crash campaign: SIGKILL the agent at points chosen from its own progress; nothing lost or twice.

The agent (tests/campaigns/agent_process.py) is a subprocess that captures real recordings and
syncs them through a fault proxy (tests/faultproxy.py, mode "http") in front of moto's S3
server, which lives in the test process: killing the agent never takes S3 down. Each run is
armed for one window and the kill lands inside it, timed from the agent's progress:
- the agent stops at a checkpoint (package.*, capture.queued, drain.*), says so on stdout and
  waits; the campaign SIGKILLs it (after a random delay of up to KILL_DELAY_S, in which the
  agent's other threads run on);
- or the proxy kills it on a PUT: before forwarding it, or after S3 stored it and answered,
  before the answer reaches the agent (the lost answer).
Killed runs are restarted (the agent resumes: it skips captures it made and drains what is
queued) until every window was hit HITS times; one last run without a kill delivers the rest.
Then every record is in the bucket once, every object byte-identical to what its manifest
says, and the outbox and reports/upload_log.json agree with the bucket.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import boto3
import pytest

from device_agent.documents.package import DATA_KINDS, file_names
from device_agent.shipping.outbox import DB_NAME, DELIVERED, Outbox, read_only_stats
from tests.campaigns.agent_process import ANNOUNCE, captured_stamps, stamp_of
from tests.faultproxy import BEFORE_ANSWER, BEFORE_FORWARD, FaultProxy, Sprung

AGENT = Path(__file__).with_name("agent_process.py")
FILES_PER_RECORD = len(DATA_KINDS) + 1  # the data files (PACKAGE_DICOM is on) and the manifest
KILL_DELAY_S = 0.02
RUN_TIMEOUT_S = 60.0
OWN_COPY = re.compile(r"__[0-9a-f]{12}\.[a-z]+$")  # an object kept beside another (collision)


@dataclass(frozen=True)
class Window:
    """Where a kill may land: agent checkpoints (one picked per run) or a proxy trap."""

    name: str
    points: tuple[str, ...]


WINDOWS = (
    # between package.folder and the manifest, after one of the data files
    Window("writing", tuple(f"package.{kind}" for kind in DATA_KINDS)),
    Window("before_manifest", ("package.before_manifest",)),
    # the manifest is written, the outbox has no row yet: reconcile_folders must queue it
    Window("unqueued", ("package.manifest",)),
    # queued, not sent: right after the outbox commit, or an upload thread about to put
    Window("queued", ("capture.queued", "drain.before_put")),
    Window("before_forward", (f"proxy.{BEFORE_FORWARD}",)),
    Window("lost_answer", (f"proxy.{BEFORE_ANSWER}",)),  # S3 stored it; the agent never heard
    Window("put_answered", ("drain.put_answered",)),  # heard, not yet committed
    Window("committed", ("drain.committed",)),
)


def _capturing(point: str) -> bool:
    """Reached only while a new record is captured (else: while something is queued)."""
    return point.startswith(("package.", "capture."))


@dataclass
class Tally:
    """What the campaign did: hits per window and per point, runs, and kills out of place."""

    hits: Counter[str] = field(default_factory=Counter)
    points: Counter[str] = field(default_factory=Counter)
    runs: int = 0
    unhit_runs: int = 0  # armed, but the run finished before reaching its point
    out_of_place: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"runs": self.runs, "unhit_runs": self.unhit_runs,
                "hits": {w.name: self.hits[w.name] for w in WINDOWS},
                "points": dict(sorted(self.points.items()))}


class Campaign:
    """Runs the agent again and again, each run armed for one window, and counts the hits."""

    def __init__(self, root: Path, proxy: FaultProxy, endpoint: str, bucket: str, *,
                 records: int, seed: int) -> None:
        self.state = root / "state"
        self.logs = root / "agent-logs"
        self.logs.mkdir(parents=True)
        self.proxy = proxy
        self.bucket = bucket
        self.s3 = _client(endpoint)
        self.records = records
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.trapped: Sprung | None = None  # the proxy's last kill
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}

    def captured(self) -> int:
        return len(captured_stamps(self.state / "records"))

    def pending(self) -> int:
        stats = read_only_stats(self.state)
        return 0 if stats is None else stats.pending

    def reachable(self, point: str) -> bool:
        return self.captured() < self.records or (not _capturing(point) and self.pending() > 0)

    def hit_every_window(self, hits: int) -> None:
        """Armed runs, round by round over the windows still short of `hits`."""
        max_runs = 4 * hits * len(WINDOWS)
        while self.tally.runs < max_runs:
            short = [w for w in WINDOWS if self.tally.hits[w.name] < hits
                     and any(self.reachable(p) for p in w.points)]
            if not short:
                return
            self.rng.shuffle(short)
            for window in short:
                points = [p for p in window.points if self.reachable(p)]
                if points:
                    self.armed_run(window, self.rng.choice(points))

    def armed_run(self, window: Window, point: str) -> None:
        """One run that captures one or two new records (or none, with work queued)."""
        captured, pending = self.captured(), self.pending()
        if _capturing(point):
            new = self.rng.randint(1, 2)
        else:
            new = self.rng.choice((0, 1)) if pending else 1
        records = min(self.records, captured + new)
        new = records - captured
        if _capturing(point):  # the at-th record this run captures
            at = self.rng.randint(1, new)
        else:  # the at-th put (or answer, or commit) of this run
            at = self.rng.randint(1, max(1, min(4, pending + FILES_PER_RECORD * new)))
        hit = self.run(records, point=point, at=at)
        if hit is None:
            self.tally.unhit_runs += 1
            return
        self.tally.hits[window.name] += 1
        self.tally.points[hit] += 1
        problem = self.where_it_landed(hit, stamp_of(captured + at - 1))
        if problem:
            self.tally.out_of_place.append(f"run {self.tally.runs} killed at {hit}: {problem}")

    def run(self, records: int, *, point: str | None = None, at: int = 1) -> str | None:
        """Start the agent, kill it where armed; the point it was killed at, or None."""
        n = self.tally.runs = self.tally.runs + 1
        cmd = [sys.executable, str(AGENT), "--state", str(self.state), "--endpoint",
               self.proxy.url, "--bucket", self.bucket, "--records", str(records)]
        killer: list[subprocess.Popen[bytes]] = []
        if point and point.startswith("proxy."):
            self.proxy.arm(point.removeprefix("proxy."), nth=at, action=lambda line: killer[0]
                           .send_signal(signal.SIGKILL))
        elif point:
            cmd += ["--arm", point, "--at", str(at)]
        sprung_before = len(self.proxy.sprung)
        err_path = self.logs / f"run{n:03d}.err"
        with err_path.open("wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=self.env)
        killer.append(proc)
        hit: str | None = None
        out = b""
        try:
            out, announced = _read_until_announced(proc, RUN_TIMEOUT_S)
            if announced:
                try:  # its other threads run on meanwhile; it must not end by itself
                    proc.wait(timeout=self.rng.uniform(0.0, KILL_DELAY_S))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    hit = announced
        finally:
            self.proxy.disarm()
            if proc.poll() is None and hit is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            assert proc.stdout is not None
            proc.stdout.close()
        log = err_path.read_text(errors="replace")[-3000:]
        if hit is not None:
            return hit
        if len(self.proxy.sprung) > sprung_before:
            assert proc.returncode == -signal.SIGKILL, log
            self.trapped = self.proxy.sprung[-1]
            return f"proxy.{self.trapped.when}"
        assert proc.returncode == 0 and b"done pending=0" in out, (
            f"run {n} ({' '.join(cmd[2:])}) ended with {proc.returncode}: {out!r}\n{log}")
        return None

    # --- did the kill land where it was meant to? ---------------------------------------

    def items(self, where: str, args: tuple[str, ...]) -> list[tuple[str, str, str]]:
        """(key, state, sha256) of the outbox rows matching `where`, read-only."""
        db = sqlite3.connect(f"file:{self.state / DB_NAME}?mode=ro", uri=True)
        try:
            return db.execute(f"SELECT key, state, sha256 FROM items WHERE {where}",
                              args).fetchall()
        finally:
            db.close()

    def stored(self, key: str, sha256: str) -> bool:
        """Does the bucket hold exactly this object (S3's own SHA-256 checksum)?"""
        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except self.s3.exceptions.ClientError:
            return False
        return base64.b64decode(head.get("ChecksumSHA256", "")).hex() == sha256

    def where_it_landed(self, point: str, stamp: str) -> str | None:
        """What is wrong with the state the kill left for its window, or None."""
        folders = sorted((self.state / "records").glob(f"{stamp}*"))
        complete = [f for f in folders if (f / f"manifest_{stamp}.json").exists()]
        names = file_names(stamp)
        rows = self.items("key LIKE ?", (f"%/{stamp}/%",))
        if point.startswith("package.") and point != "package.manifest":
            kinds = (DATA_KINDS if point == "package.before_manifest"
                     else (point.removeprefix("package."),))
            if complete or not any(all((f / names[k]).exists() for k in kinds)
                                   for f in folders):
                return f"{stamp}: no partial folder holding {kinds}"
        elif point == "package.manifest":
            if len(complete) != 1 or rows:
                return f"{stamp}: {len(complete)} complete folders, {len(rows)} outbox rows"
        elif point == "capture.queued":
            if len(rows) != FILES_PER_RECORD or any(
                    state != "pending" or self.stored(key, sha) for key, state, sha in rows):
                return f"{stamp}: not queued, or something already sent: {rows}"
        elif point == "drain.put_answered":  # an answered put is in the bucket, uncommitted
            if not any(self.stored(key, sha)
                       for key, _, sha in self.items("state = 'pending'", ())):
                return "no pending item is in the bucket"
        elif point.startswith("proxy."):
            assert self.trapped is not None
            key = unquote(urlparse(self.trapped.request_line.split(" ")[1]).path).split(
                "/", 2)[2]
            (row,) = self.items("key = ?", (key,)) or [(key, "unknown", "")]
            if row[1] != "pending":
                return f"{key} is {row[1]}, not pending"
            if point == f"proxy.{BEFORE_ANSWER}" and not self.stored(key, row[2]):
                return f"{key}: S3 answered 2xx but does not hold it"
        return None


def _read_until_announced(proc: subprocess.Popen[bytes], timeout: float
                          ) -> tuple[bytes, str | None]:
    """The agent's stdout until it announces a checkpoint (its name) or exits (None)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    out = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the agent neither stopped nor ended in {timeout} s: {out!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return out, None
        out += chunk
        for line in out.decode("ascii", "replace").splitlines():
            if line.startswith(ANNOUNCE):
                return out, line[len(ANNOUNCE):].strip()


# --- what must hold afterwards ---------------------------------------------------------------

def _client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _bucket(endpoint: str, bucket: str) -> dict[str, bytes]:
    client = _client(endpoint)
    objects: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            objects[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return objects


def _sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _check(state: Path, objects: dict[str, bytes], records: int) -> dict[str, list[str]]:
    """Every broken promise, by kind; all lists empty when the campaign held."""
    problems: dict[str, list[str]] = {k: [] for k in (
        "lost", "duplicated", "torn", "strays", "local", "outbox", "upload_log")}
    shas = {key: _sha(body) for key, body in objects.items()}
    manifests: dict[str, list[str]] = {}
    for key in objects:
        name = key.rsplit("/", 1)[-1]
        if OWN_COPY.search(name):
            problems["duplicated"].append(f"{key}: a copy kept beside one of our own files")
        if name.startswith("manifest_"):
            manifests.setdefault(name.removeprefix("manifest_")[:15], []).append(key)
    vouched: set[str] = set()
    for index in range(records):
        stamp = stamp_of(index)
        keys = manifests.get(stamp, [])
        if not keys:
            problems["lost"].append(f"record {index} ({stamp}): no manifest in the bucket")
        elif len(keys) > 1:
            problems["duplicated"].append(f"record {index} ({stamp}): packages {keys}")
        local = sorted((state / "records").glob(f"{stamp}*/manifest_{stamp}.json"))
        if len(local) != 1:
            problems["local"].append(f"record {index} ({stamp}): {len(local)} complete folders")
        for key in keys:
            vouched.add(key)
            doc = json.loads(objects[key])
            if local and local[0].read_bytes() != objects[key]:
                problems["torn"].append(f"{key}: differs from the manifest on the unit")
            if sorted(f["kind"] for f in doc["files"]) != sorted(DATA_KINDS):
                problems["torn"].append(f"{key}: lists kinds {[f['kind'] for f in doc['files']]}")
            for entry in doc["files"]:
                vouched.add(entry["key"])
                if entry["key"] not in objects:
                    problems["lost"].append(f"{entry['key']}: in {key}, not in the bucket")
                elif (len(objects[entry["key"]]), shas[entry["key"]]) != (entry["size"],
                                                                          entry["sha256"]):
                    problems["torn"].append(f"{entry['key']}: differs from {key}")
    problems["strays"] = sorted(set(objects) - vouched)
    for path in sorted((state / "records").glob("*/manifest_*.json")):
        for entry in json.loads(path.read_bytes())["files"]:
            file = path.parent / entry["name"]
            if not file.is_file() or _sha(file.read_bytes()) != entry["sha256"]:
                problems["local"].append(f"{file}: missing or not what {path.name} says")

    db = sqlite3.connect(state / "outbox.sqlite3")
    try:
        if db.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            problems["outbox"].append("integrity_check failed")
    finally:
        db.close()
    with Outbox(state / "outbox.sqlite3") as box:
        items = box.items.all()
    packages = Counter(i.package for i in items)
    if len(packages) != records or set(packages.values()) != {FILES_PER_RECORD}:
        problems["outbox"].append(f"{len(packages)} packages queued, files {packages.values()}")
    for item in items:
        where = item.final_key or item.key
        if item.state != DELIVERED or where != item.key or shas.get(where) != item.sha256:
            problems["outbox"].append(f"item {item.id} {item.key}: {item.state} at {where}, "
                                      "not what the bucket holds")
    entries = json.loads((state / "reports" / "upload_log.json").read_text())
    if len(entries) != len(items):
        problems["upload_log"].append(f"{len(entries)} entries for {len(items)} deliveries")
    for entry in entries:
        key = entry["result"]["key"]
        if entry["result"]["status"] != "success" or shas.get(key) != entry["agent"]["sha256"]:
            problems["upload_log"].append(f"{key}: not what the bucket holds")
    return problems


def _campaign(tmp_path: Path, endpoint: str, bucket: str, *, records: int, hits: int,
              seed: int, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    started = time.monotonic()
    port = urlparse(endpoint).port
    assert port is not None
    with FaultProxy(port, seed=seed) as proxy:
        proxy.set_mode("http")
        campaign = Campaign(tmp_path, proxy, endpoint, bucket, records=records, seed=seed)
        campaign.hit_every_window(hits)
        captured_under_kills = campaign.captured()
        assert campaign.run(records) is None  # the last run: no kill, everything delivered
        proxy_counts = dict(proxy.counts)
    objects = _bucket(endpoint, bucket)
    problems = _check(campaign.state, objects, records)
    with Outbox(campaign.state / "outbox.sqlite3") as box:
        outcomes = Counter(i.outcome for i in box.items.all())
    numbers = {**campaign.tally.summary(), "records": records,
               "captured_under_kills": captured_under_kills, "objects": len(objects),
               "outcomes": dict(outcomes), "proxy_requests": proxy_counts["http_requests"],
               "problems": {k: len(v) for k, v in problems.items()},
               "seconds": round(time.monotonic() - started, 1)}
    with capsys.disabled():
        print(f"\ncrash campaign: {json.dumps(numbers)}")
    for kind, found in problems.items():
        assert not found, f"{kind}: {found[:10]}"
    assert len(objects) == FILES_PER_RECORD * records
    short = {w.name: campaign.tally.hits[w.name] for w in WINDOWS
             if campaign.tally.hits[w.name] < hits}
    assert not short, f"windows hit fewer than {hits} times: {short}"
    assert not campaign.tally.out_of_place, campaign.tally.out_of_place
    return numbers


@pytest.mark.functional
def test_crash_campaign_bounded(tmp_path: Path, s3_endpoint: str, s3_bucket: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    _campaign(tmp_path, s3_endpoint, s3_bucket, records=16, hits=3, seed=5, capsys=capsys)


@pytest.mark.slow
@pytest.mark.functional
def test_crash_campaign_full(tmp_path: Path, s3_endpoint: str, s3_bucket: str,
                             capsys: pytest.CaptureFixture[str],
                             request: pytest.FixtureRequest) -> None:
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the full campaign runs with -m slow")
    _campaign(tmp_path, s3_endpoint, s3_bucket, records=80, hits=15, seed=11, capsys=capsys)
