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
from urllib.parse import urlparse

import boto3
import pytest

from device_agent.outbox import DELIVERED, Outbox, read_only_stats
from device_agent.package import DATA_KINDS
from tests.campaigns.agent_process import ANNOUNCE, captured_stamps, stamp_of
from tests.faultproxy import BEFORE_ANSWER, BEFORE_FORWARD, FaultProxy

AGENT = Path(__file__).with_name("agent_process.py")
FILES_PER_RECORD = len(DATA_KINDS) + 1  # the data files (PACKAGE_DICOM is on) and the manifest
KILL_DELAY_S = 0.02
RUN_TIMEOUT_S = 60.0
OWN_COPY = re.compile(r"__[0-9a-f]{12}\.[a-z]+$")  # an object kept beside another (collision)


@dataclass(frozen=True)
class Window:
    """Where a kill may land: agent checkpoints (one picked per run) or a proxy trap."""

    name: str
    checkpoints: tuple[str, ...] = ()
    trap: str | None = None
    capturing: bool = False  # reached only while a new record is being captured


WINDOWS = (
    # between package.folder and the manifest, after one of the data files
    Window("writing", tuple(f"package.{kind}" for kind in DATA_KINDS), capturing=True),
    Window("before_manifest", ("package.before_manifest",), capturing=True),
    # the manifest is written, the outbox has no row yet: reconcile_folders must queue it
    Window("unqueued", ("package.manifest",), capturing=True),
    # queued, not sent: right after the outbox commit, or an upload thread about to put
    Window("queued", ("capture.queued", "drain.before_put")),
    Window("before_forward", trap=BEFORE_FORWARD),
    Window("lost_answer", trap=BEFORE_ANSWER),  # S3 stored it; the agent never heard
    Window("put_answered", ("drain.put_answered",)),  # heard, not yet committed
    Window("committed", ("drain.committed",)),
)


@dataclass
class Tally:
    """What the campaign did: hits per window and per point, runs, and how long."""

    hits: Counter[str] = field(default_factory=Counter)
    points: Counter[str] = field(default_factory=Counter)
    runs: int = 0
    unhit_runs: int = 0  # armed, but the run finished before reaching its point

    def summary(self) -> dict[str, Any]:
        return {"runs": self.runs, "unhit_runs": self.unhit_runs,
                "hits": {w.name: self.hits[w.name] for w in WINDOWS},
                "points": dict(sorted(self.points.items()))}


class Campaign:
    """Runs the agent again and again, each run armed for one window, and counts the hits."""

    def __init__(self, root: Path, proxy: FaultProxy, bucket: str, *, records: int,
                 seed: int) -> None:
        self.state = root / "state"
        self.logs = root / "agent-logs"
        self.logs.mkdir(parents=True)
        self.proxy = proxy
        self.bucket = bucket
        self.records = records
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}

    def captured(self) -> int:
        return len(captured_stamps(self.state / "records"))

    def pending(self) -> int:
        stats = read_only_stats(self.state)
        return 0 if stats is None else stats.pending

    def hit_every_window(self, hits: int) -> None:
        """Armed runs, round by round over the windows still short of `hits`."""
        max_runs = 4 * hits * len(WINDOWS)
        while self.tally.runs < max_runs:
            short = [w for w in WINDOWS if self.tally.hits[w.name] < hits
                     and not (w.capturing and self.captured() >= self.records)]
            if not short:
                return
            self.rng.shuffle(short)
            for window in short:
                self.armed_run(window)

    def armed_run(self, window: Window) -> None:
        """One run that captures one or two new records (or none, with work queued)."""
        captured, pending = self.captured(), self.pending()
        if window.capturing:
            new = self.rng.randint(1, 2)
        else:
            new = self.rng.choice((0, 1)) if pending else 1
        records = min(self.records, captured + new)
        new = records - captured
        if window.capturing:
            if new == 0:
                return
            at = self.rng.randint(1, new)
        else:
            at = self.rng.randint(1, max(1, min(4, pending + FILES_PER_RECORD * new)))
        point = self.rng.choice(window.checkpoints) if window.checkpoints else window.trap
        assert point is not None
        if window.name == "queued" and point == "capture.queued":
            at = self.rng.randint(1, max(1, new))
        hit = self.run(records, checkpoint=point if window.checkpoints else None,
                       trap=window.trap, at=at)
        if hit is None:
            self.tally.unhit_runs += 1
        else:
            self.tally.hits[window.name] += 1
            self.tally.points[hit] += 1

    def run(self, records: int, *, checkpoint: str | None = None, trap: str | None = None,
            at: int = 1) -> str | None:
        """Start the agent, kill it where armed; the point it was killed at, or None."""
        n = self.tally.runs = self.tally.runs + 1
        cmd = [sys.executable, str(AGENT), "--state", str(self.state), "--endpoint",
               self.proxy.url, "--bucket", self.bucket, "--records", str(records)]
        if checkpoint:
            cmd += ["--arm", checkpoint, "--at", str(at)]
        killer: list[subprocess.Popen[bytes]] = []
        if trap:
            self.proxy.arm(trap, nth=at, action=lambda line: killer[0].send_signal(
                signal.SIGKILL))
        sprung_before = len(self.proxy.sprung)
        err_path = self.logs / f"run{n:03d}.err"
        with err_path.open("wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=self.env)
        killer.append(proc)
        assert proc.stdout is not None
        hit: str | None = None
        out = b""
        try:
            out, announced = _read_until_announced(proc, RUN_TIMEOUT_S)
            if announced:
                with pytest.raises(subprocess.TimeoutExpired):  # it waits to be killed
                    proc.wait(timeout=self.rng.uniform(0.0, KILL_DELAY_S))
                proc.send_signal(signal.SIGKILL)
                hit = announced
        finally:
            self.proxy.disarm()
            if proc.poll() is None and hit is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            proc.stdout.close()
        log = err_path.read_text(errors="replace")[-3000:]
        if hit is not None:
            return hit
        if len(self.proxy.sprung) > sprung_before:
            assert proc.returncode == -signal.SIGKILL, log
            return f"proxy.{self.proxy.sprung[-1].when}"
        assert proc.returncode == 0 and b"done pending=0" in out, (
            f"run {n} ({' '.join(cmd[2:])}) ended with {proc.returncode}: {out!r}\n{log}")
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

def _bucket(endpoint: str, bucket: str) -> dict[str, bytes]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
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
        items = box.items()
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
        if shas.get(entry["s3_key"]) != entry["sha256"]:
            problems["upload_log"].append(f"{entry['s3_key']}: not what the bucket holds")
    return problems


def _campaign(tmp_path: Path, endpoint: str, bucket: str, *, records: int, hits: int,
              seed: int, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    started = time.monotonic()
    port = urlparse(endpoint).port
    assert port is not None
    with FaultProxy(port, seed=seed) as proxy:
        proxy.set_mode("http")
        campaign = Campaign(tmp_path, proxy, bucket, records=records, seed=seed)
        campaign.hit_every_window(hits)
        captured_under_kills = campaign.captured()
        assert campaign.run(records) is None  # the last run: no kill, everything delivered
        proxy_counts = dict(proxy.counts)
    objects = _bucket(endpoint, bucket)
    problems = _check(campaign.state, objects, records)
    with Outbox(campaign.state / "outbox.sqlite3") as box:
        outcomes = Counter(i.outcome for i in box.items())
    numbers = {**campaign.tally.summary(), "records": records,
               "captured_under_kills": captured_under_kills, "objects": len(objects),
               "outcomes": dict(outcomes), "proxy_requests": proxy_counts["http_requests"],
               "problems": {k: len(v) for k, v in problems.items()},
               "seconds": round(time.monotonic() - started, 1)}
    with capsys.disabled():
        print(f"\ncrash campaign: {json.dumps(numbers)}")
    short = {w.name: campaign.tally.hits[w.name] for w in WINDOWS
             if campaign.tally.hits[w.name] < hits}
    assert not short, f"windows hit fewer than {hits} times: {short}"
    for kind, found in problems.items():
        assert not found, f"{kind}: {found[:10]}"
    assert len(objects) == FILES_PER_RECORD * records
    return numbers


@pytest.mark.functional
def test_crash_campaign_bounded(tmp_path, s3_endpoint, s3_bucket, capsys):
    _campaign(tmp_path, s3_endpoint, s3_bucket, records=16, hits=3, seed=5, capsys=capsys)


@pytest.mark.slow
@pytest.mark.functional
def test_crash_campaign_full(tmp_path, s3_endpoint, s3_bucket, capsys, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the full campaign runs with -m slow")
    _campaign(tmp_path, s3_endpoint, s3_bucket, records=80, hits=15, seed=11, capsys=capsys)
