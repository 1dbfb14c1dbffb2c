"""Power-loss proof (issue 13): a power cut at every point of a capture and of a sync pass.

One capture's packaging and queueing (tests/campaigns/powercut_capture.py) and one real
`device-agent sync --once` against moto's HTTP server run under strace; powercut.py turns
each trace into its write order and builds, for every prefix of it, the disk a power cut
there may leave (every write landed; or only what was fsynced) and the bucket it leaves (S3
is not rolled back: answered PUTs landed; one in flight may or may not have). Each state
is then rebooted in-process: Outbox.open, sync passes against moto's in-process S3 holding
that bucket, and the promises are checked:
- nothing acknowledged is lost: a capture whose package_and_decide returned (and every
  package folder that has its manifest) ends up complete in S3; an item the outbox
  committed as delivered is in the bucket;
- nothing half-written is uploaded or visible: every object is byte-identical to the file
  its manifest vouches for, a manifest lists nothing that is not there with that hash, no
  file under its final name is torn;
- nothing is uploaded twice (no `__sha12` copies of our own files);
- the outbox opens (integrity_check ok) and reports/upload_log.json parses.
Identical states (same bytes on disk, same bucket) are recovered once and the verdict reused.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import platform
import shutil
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import pytest

from device_agent.core.config import Settings
from tests.campaigns import powercut
from tests.campaigns.agent_process import ECG, settings_for
from tests.campaigns.powercut import CrashState, Disk, Image, Op

HARNESS = Path(__file__).with_name("powercut_capture.py")
ACQUIRED_AT = "2026-11-27T09:00:00+01:00"
REPORT_NAME = "ECG_Report_20261127_083000.pdf"  # a report another program dropped
REPLAY_BUCKET = "powercut-replay-bucket"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
ACKNOWLEDGED = "capture.acknowledged"  # the harness's marker: package_and_decide returned

# as with pdftoppm and systemd-analyze: skipped where missing, and .ci/run installs it
pytestmark = pytest.mark.skipif(shutil.which("strace") is None,
                                reason="strace is not installed (Debian package strace)")


@dataclass(frozen=True)
class Stored:
    """An object as S3 holds it (enough to put it back the same way)."""

    key: str
    body: bytes
    content_type: str
    metadata: dict[str, str]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


@dataclass
class Traced:
    """Both traced runs, the disk before each, and what a run without a cut delivered."""

    state: Path
    reports: Path
    users: Path
    capture_ops: list[Op]
    before_capture: Disk
    sync_ops: list[Op]
    before_sync: Disk
    reference: dict[str, Stored]  # the bucket after the uncut sync pass
    package_files: dict[str, bytes]  # package folder path -> bytes, as the capture left them
    report_key: str
    seconds: float

    @property
    def roots(self) -> tuple[Path, Path]:
        return self.state, self.reports

    @property
    def package_keys(self) -> list[str]:
        return sorted(k for k in self.reference if k != self.report_key)


def _settings_args(state: Path, reports: Path, users: Path, **extra: str) -> list[str]:
    values = {"STATE_DIR": str(state), "REPORTS_DIR": str(reports), "USERS_FILE": str(users),
              "AWS_S3_REGION": "us-east-1", "DEVICE_SERIAL": "SN-CRASH-01",
              "CLOCK_CHECK": "floor", "S3_CONNECT_TIMEOUT_S": "2", "S3_READ_TIMEOUT_S": "10",
              "S3_MAX_ATTEMPTS": "1", **extra}
    return [arg for k, v in values.items() for arg in ("--set", f"{k}={v}")]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def _read_bucket(client: Any, bucket: str) -> dict[str, Stored]:
    """Every object of a bucket (a boto3 S3 client: untyped without stubs)."""
    found: dict[str, Stored] = {}
    for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        got = client.get_object(Bucket=bucket, Key=obj["Key"])
        found[obj["Key"]] = Stored(obj["Key"], got["Body"].read(), got["ContentType"],
                                   dict(got.get("Metadata") or {}))
    return found


def _report_pdf(settings_state: Path) -> bytes:
    """A real report PDF (another recording), as a legacy program drops it in REPORTS_DIR."""
    from device_agent.capture import PackageEncoders, measure_once
    from device_agent.lab import wfdb

    settings = settings_for(settings_state, "http://127.0.0.1:9", "unused")
    record = measure_once(wfdb.to_record(ECG / "HR06001.hea"), mains_hz=settings.mains_hz)
    return PackageEncoders(settings).pdf(record, {"first_name": "Synthetic",
                                                  "last_name": "Report", "age": 40})


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Traced:
    """Trace one capture, drop a report, trace one sync pass; keep what each left."""
    started = time.monotonic()
    root = tmp_path_factory.mktemp("powercut").resolve()
    state, reports, users = root / "state", root / "reports", root / "users.json"
    state.mkdir()
    reports.mkdir()
    roots = (state, reports)

    # (a) a fresh unit's first capture: no outbox, no records folder yet
    before_capture = Disk.snapshot(roots)
    run = powercut.trace(
        [sys.executable, str(HARNESS), "--state", str(state), "--at", ACQUIRED_AT,
         "--set", f"REPORTS_DIR={reports}", "--set", f"USERS_FILE={users}"],
        root / "capture.trace", env=_env(), cwd=root, timeout=120)
    assert run.returncode == 0, f"capture harness failed:\n{run.stdout}\n{run.stderr[-3000:]}"
    capture_ops = powercut.parse_ops((root / "capture.trace").read_text(), roots)
    (folder,) = (p for p in (state / "records").iterdir() if p.is_dir())
    package_files = {str(p): p.read_bytes() for p in folder.iterdir()}

    report = reports / REPORT_NAME
    report.write_bytes(_report_pdf(root / "scratch"))
    old = datetime.fromisoformat("2026-11-27T08:30:00+01:00").timestamp()
    os.utime(report, (old, old))

    # (b) one sync pass of the real CLI against moto's HTTP server
    bucket = "powercut-traced-bucket"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=bucket)
    before_sync = Disk.snapshot(roots)
    argv = [sys.executable, "-m", "device_agent",
            *_settings_args(state, reports, users, AWS_S3_BUCKET=bucket,
                            AWS_ENDPOINT_URL_S3=s3_endpoint, **CREDENTIALS),
            "sync", "--once"]
    run = powercut.trace(argv, root / "sync.trace", env=_env(), cwd=root, timeout=120)
    assert run.returncode == 0, f"traced sync failed:\n{run.stdout}\n{run.stderr[-3000:]}"
    sync_ops = powercut.parse_ops((root / "sync.trace").read_text(), roots, bucket=bucket)
    reference = _read_bucket(client, bucket)
    for key in reference:
        client.delete_object(Bucket=bucket, Key=key)
    client.delete_bucket(Bucket=bucket)
    (report_key,) = (k for k in reference if k.endswith("/" + REPORT_NAME))
    return Traced(state, reports, users, capture_ops, before_capture, sync_ops, before_sync,
                  reference, package_files, report_key, time.monotonic() - started)


# --- recovery --------------------------------------------------------------------------


@dataclass
class Verdict:
    """What one recovery showed: broken promises (empty: none) and how it recovered."""

    problems: list[str]
    how: str


@dataclass
class Replayer:
    """Reboots crash states in-process against moto's in-process S3, one at a time."""

    traced: Traced
    client: Any  # a boto3 S3 client on moto's in-process backend
    cache: dict[tuple[str, frozenset[str], bool], Verdict] = field(default_factory=dict)
    recoveries: int = 0

    def settings(self) -> Settings:
        t = self.traced
        return settings_for(t.state, "http://127.0.0.1:9", REPLAY_BUCKET,
                            REPORTS_DIR=str(t.reports), USERS_FILE=str(t.users))

    def verdict(self, crash: CrashState, *, acknowledged: bool) -> Verdict:
        key = (crash.image.signature(), crash.landed, acknowledged)
        if key not in self.cache:
            self.cache[key] = self._recover(crash, acknowledged=acknowledged)
            self.recoveries += 1
        return self.cache[key]

    # the bucket

    def _reset_bucket(self, landed: frozenset[str]) -> None:
        c = self.client
        for obj in c.list_objects_v2(Bucket=REPLAY_BUCKET).get("Contents", []):
            c.delete_object(Bucket=REPLAY_BUCKET, Key=obj["Key"])
        for key in sorted(landed):  # as the agent put them: the checksum is what 412s compare
            obj = self.traced.reference[key]
            c.put_object(Bucket=REPLAY_BUCKET, Key=key, Body=obj.body,
                         ContentType=obj.content_type, Metadata=obj.metadata,
                         ChecksumAlgorithm="SHA256",
                         ChecksumSHA256=base64.b64encode(bytes.fromhex(obj.sha256)).decode())

    # one reboot

    def _recover(self, crash: CrashState, *, acknowledged: bool) -> Verdict:
        from device_agent.core.clock import clock_from_settings
        from device_agent.shipping.drain import Drainer, SynchronousExecutor
        from device_agent.shipping.outbox import DB_NAME, Outbox
        from device_agent.shipping.uploader import Uploader
        from device_agent.sync import SyncLoop

        t = self.traced
        powercut.materialise(crash.image, t.roots)
        problems = self._torn(crash.image) + self._log_problems("after the cut")
        self._reset_bucket(crash.landed)
        manifest_on_disk = any(Path(p).name.startswith("manifest_")
                               for p, f in crash.image.entries.items() if f is not None)
        settings = self.settings()
        try:
            outbox = Outbox.open(settings)
        except Exception as exc:
            return Verdict([*problems, f"the outbox does not open: {exc!r}"], "outbox lost")
        with outbox:
            problems += self._integrity(t.state / DB_NAME)
            for item in outbox.items.delivered():
                obj = t.reference.get(item.final_key or "")
                if item.final_key not in crash.landed or obj is None or \
                        obj.sha256 != item.sha256:
                    problems.append(f"the outbox committed {item.final_key} as delivered but "
                                    "the bucket does not hold it")
            committed = {i.id for i in outbox.items.delivered()}
            stop = threading.Event()
            clock = clock_from_settings(settings)
            uploader = Uploader.from_settings(settings, client=self.client)
            drainer = Drainer(outbox, uploader, clock=clock, stop=stop,
                              executor=SynchronousExecutor(), backoff_base_s=0.0,
                              backoff_cap_s=0.0)
            loop = SyncLoop(settings, outbox=outbox, drainer=drainer, stop=stop, clock=clock)
            queued = 0
            errors: list[str] = []
            try:
                for _ in range(3):
                    result = loop.run_once(wait=False)
                    queued += result.packages_queued + result.reports_queued
                    errors += result.errors
                    if result.pending == 0 and not result.errors:
                        break
            finally:
                loop.close()
            items = outbox.items.all()
        problems += [f"recovery pass error: {e}" for e in errors]
        problems += [f"item {i.filename} left {i.state} after recovery ({i.last_error})"
                     for i in items if i.state != "delivered"]
        problems += self._log_problems("after recovery")
        problems += self._integrity(t.state / DB_NAME)
        bucket = _read_bucket(self.client, REPLAY_BUCKET)
        problems += self._bucket_problems(bucket)
        package_complete = all(k in bucket for k in t.package_keys)
        if (acknowledged or manifest_on_disk) and not package_complete:
            missing = [k.rsplit("/", 1)[-1] for k in t.package_keys if k not in bucket]
            what = "acknowledged capture" if acknowledged else "package with its manifest"
            problems.append(f"{what} not complete in S3 after recovery: missing {missing}")
        if t.reports / REPORT_NAME in map(Path, crash.image.entries) and \
                t.report_key not in bucket:
            problems.append("the report in REPORTS_DIR was not uploaded after recovery")
        outcomes = Counter(i.outcome for i in items if i.id not in committed and i.outcome)
        how = ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items())) or "nothing to send"
        if queued:
            how = f"queued {queued} by the finders; {how}"
        if not package_complete and not manifest_on_disk:
            how += "; unfinished capture left unsent"
        return Verdict(problems, how)

    def _torn(self, image: Image) -> list[str]:
        """Files under their final names must be whole: the old content or the new."""
        problems = []
        for path, want in self.traced.package_files.items():
            got = image.get(path)
            if got is not None and got != want:
                problems.append(f"{Path(path).name} is torn under its final name "
                                f"({len(got)} of {len(want)} bytes, different content)")
        return problems

    def _log_problems(self, when: str) -> list[str]:
        path = self.traced.reports / "upload_log.json"
        if not path.exists():
            return []
        try:
            entries = json.loads(path.read_bytes())
        except ValueError as exc:
            return [f"upload_log.json does not parse {when}: {exc}"]
        return [] if isinstance(entries, list) else [f"upload_log.json is not a list {when}"]

    @staticmethod
    def _integrity(db: Path) -> list[str]:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            conn.close()
        return [] if verdict == "ok" else [f"outbox integrity_check: {verdict}"]

    def _bucket_problems(self, bucket: dict[str, Stored]) -> list[str]:
        problems = []
        ref = self.traced.reference
        shas = Counter(obj.sha256 for obj in bucket.values())
        for key, obj in bucket.items():
            name = key.rsplit("/", 1)[-1]
            if "__" in name:
                problems.append(f"{name}: a disambiguated copy of our own file (sent twice)")
            elif key not in ref:
                problems.append(f"{key}: an object no uncut run uploads")
            elif obj.body != ref[key].body:
                problems.append(f"{name}: the object differs from the file (half-written)")
            if shas[obj.sha256] > 1:
                problems.append(f"{name}: the same bytes are in the bucket more than once")
            if name.startswith("manifest_"):
                for entry in json.loads(obj.body)["files"]:
                    held = bucket.get(entry["key"])
                    if held is None or held.sha256 != entry["sha256"] or \
                            len(held.body) != entry["size"]:
                        problems.append(f"{name} lists {entry['name']} but the bucket does "
                                        "not hold it with that hash")
        return problems


@pytest.fixture
def replayer(traced: Traced) -> Iterator[Replayer]:
    """moto's in-process S3 (the traced run used its HTTP server) and a fresh replayer."""
    from moto import mock_aws

    mock = mock_aws()
    mock.start(reset=False)  # the session's moto server shares the backend: leave it be
    try:
        client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="testing",
                              aws_secret_access_key="testing")
        client.create_bucket(Bucket=REPLAY_BUCKET)
        yield Replayer(traced, client)
        for obj in client.list_objects_v2(Bucket=REPLAY_BUCKET).get("Contents", []):
            client.delete_object(Bucket=REPLAY_BUCKET, Key=obj["Key"])
        client.delete_bucket(Bucket=REPLAY_BUCKET)
    finally:
        mock.stop(remove_data=False)


# --- the campaign ------------------------------------------------------------------------


@dataclass
class Tally:
    """Counts of one campaign, for the printed line and the assertions."""

    ops: int
    prefixes: int = 0
    checked: int = 0
    by_variant: Counter[str] = field(default_factory=Counter)
    how: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def _campaign(replayer: Replayer, ops: Sequence[Op], before: Disk, *, capture: bool,
              fs_variants: Sequence[str], each_in_flight: bool = False) -> Tally:
    tally = Tally(len(ops))
    prefixes = set()
    for crash in powercut.crash_states(copy.deepcopy(before), ops, fs_variants=fs_variants,
                                       each_in_flight=each_in_flight):
        prefixes.add(crash.prefix)
        acknowledged = ACKNOWLEDGED in crash.marks if capture else True
        verdict = replayer.verdict(crash, acknowledged=acknowledged)
        tally.checked += 1
        bucket = crash.bucket_variant
        tally.by_variant[f"{crash.fs_variant}/"
                         f"{'one in-flight PUT landed' if bucket.startswith('only') else bucket}"
                         ] += 1
        tally.how[verdict.how] += 1
        tally.failures += [f"{crash.label()}: {p}" for p in verdict.problems]
    tally.prefixes = len(prefixes)
    return tally


def _report(name: str, tally: Tally, replayer: Replayer, seconds: float,
            capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print(f"\npower cut, {name}: {tally.ops} ops traced, {tally.prefixes} prefixes, "
              f"{tally.checked} states checked ({dict(tally.by_variant)}), "
              f"{replayer.recoveries} distinct recoveries, {len(tally.failures)} broken "
              f"promises, {seconds:.1f} s on {platform.machine()} "
              f"({os.cpu_count()} cpus, {_cpu_model()})")
        for how, n in tally.how.most_common():
            print(f"  {n:4d} x {how}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def _check(tally: Tally) -> None:
    assert not tally.failures, (f"{len(tally.failures)} broken promises, first ones:\n"
                                + "\n".join(tally.failures[:25]))


@pytest.mark.functional
def test_the_trace_replays_to_the_disk_the_run_left(
        traced: Traced, capsys: pytest.CaptureFixture[str]) -> None:
    """The model is faithful: replaying every traced op gives the files each run left."""
    with capsys.disabled():
        print(f"\npower cut traces ({traced.seconds:.1f} s): capture "
              f"{powercut.summary(traced.capture_ops)}, sync pass "
              f"{powercut.summary(traced.sync_ops)}")
    counts = powercut.summary(traced.capture_ops)
    assert counts.get("mark", 0) == 2 and counts["rename"] >= 6 and counts["sync"] >= 10
    assert [op.path for op in traced.capture_ops if op.kind == "mark"][-1] == ACKNOWLEDGED
    sent = Counter(op.path for op in traced.sync_ops if op.kind == "put_sent")
    answered = Counter(op.path for op in traced.sync_ops if op.kind == "put_answered")
    assert set(sent) == set(traced.reference), "every object's PUT is in the sync trace"
    assert sent == answered, "every PUT sent was seen answered"
    disk = copy.deepcopy(traced.before_sync)
    for op in traced.sync_ops:
        disk.apply(op)
    image = disk.image(powercut.EXACT)
    on_disk = {str(p) for root in traced.roots for p in root.rglob("*")}
    assert set(image.entries) == on_disk
    for path, f in image.entries.items():
        if f is not None:
            assert f.data == Path(path).read_bytes(), f"{path} replays differently"


@pytest.mark.functional
def test_a_power_cut_anywhere_in_a_capture_loses_nothing_acknowledged(
        traced: Traced, replayer: Replayer, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    tally = _campaign(replayer, traced.capture_ops, traced.before_capture, capture=True,
                      fs_variants=(powercut.EXACT, powercut.SYNCED))
    _report("one capture", tally, replayer, time.monotonic() - started, capsys)
    assert tally.prefixes == len(traced.capture_ops) + 1
    _check(tally)


@pytest.mark.functional
def test_a_power_cut_anywhere_in_a_sync_pass_loses_nothing_and_sends_nothing_twice(
        traced: Traced, replayer: Replayer, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    tally = _campaign(replayer, traced.sync_ops, traced.before_sync, capture=False,
                      fs_variants=(powercut.EXACT, powercut.SYNCED))
    _report("one sync pass", tally, replayer, time.monotonic() - started, capsys)
    assert tally.prefixes == len(traced.sync_ops) + 1
    assert tally.by_variant[f"{powercut.EXACT}/{powercut.IN_FLIGHT_LANDED}"] > 0
    _check(tally)


@pytest.mark.slow
@pytest.mark.functional
@pytest.mark.parametrize("run", ["capture", "sync"])
def test_a_power_cut_that_keeps_names_but_not_data_or_data_but_not_names(
        traced: Traced, replayer: Replayer, capsys: pytest.CaptureFixture[str],
        run: str) -> None:
    """More disks a cut may leave: bytes not yet fsynced read back as zeros under names as
    written (metadata before data), unsynced names lost with all data landed, names as
    written with unsynced data lost; and each PUT in flight landing alone."""
    started = time.monotonic()
    ops, before = ((traced.capture_ops, traced.before_capture) if run == "capture"
                   else (traced.sync_ops, traced.before_sync))
    tally = _campaign(replayer, ops, before, capture=run == "capture",
                      fs_variants=(powercut.ZEROED, powercut.NAMES_SYNCED_DATA_EXACT,
                                   powercut.NAMES_EXACT_DATA_SYNCED),
                      each_in_flight=True)
    _report(f"{run}, more variants", tally, replayer, time.monotonic() - started, capsys)
    assert tally.prefixes == len(ops) + 1
    _check(tally)
