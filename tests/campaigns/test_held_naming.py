"""A held record keeps the name it was given: a SIGKILL between naming and queuing, then a
retry with the clock 1 ms later, still delivers one record under one stamp (issue 22 item 3).

A record captured before the clock was synchronised is held (clock.py) and named once the
clock is known. The name is derived from the clock at release time, so two releases a
millisecond apart can fall either side of a second: each stamp is a new package folder, and
before the name was made durable the killed run's folder (reconciled) and the retry's both
went to S3 with the same record_id. Here a real subprocess (held_process.py) is SIGKILLed at
each checkpoint of that window, named so it lands at x.9995 s; the retry names it at
x+1.0005 s. Then S3 (moto's HTTP server) holds one package, one stamp, one record_id.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path

import boto3
import pytest

from device_agent.capture import hold_record, measure_once
from device_agent.core.clock import HoldTicket, boot_id, held_dir
from device_agent.documents.package import DATA_KINDS, file_names
from device_agent.shipping.outbox import Outbox
from tests.campaigns.agent_process import make_record, settings_for
from tests.campaigns.test_crash_campaign import _read_until_announced

HELD_AGENT = Path(__file__).with_name("held_process.py")
RUN_TIMEOUT_S = 60.0
# every checkpoint from the name being chosen to the held copy being removed
WINDOW = ("held.named", "package.folder", *(f"package.{kind}" for kind in DATA_KINDS),
          "package.before_manifest", "package.manifest", "capture.queued", "held.packaged")
NAMED_AT = datetime(2026, 11, 28, 10, 0, 0).astimezone().timestamp() + 0.9995  # x.9995 s


def _hold_one(state: Path, endpoint: str, bucket: str) -> tuple[str, float]:
    """A held capture as capture_package leaves it (clock unsynchronised); record id and
    the monotonic time of its ticket."""
    settings = settings_for(state, endpoint, bucket)
    record = make_record(0, settings.device_serial)
    record = measure_once(dataclasses.replace(record, record_id=str(uuid.uuid4())),
                          mains_hz=settings.mains_hz)
    ticket = HoldTicket(monotonic_at_capture=time.monotonic(), boot_id=boot_id(),
                        wall_at_capture=3600.0)
    hold_record(settings, record, {"first_name": "Synthetic", "last_name": "Held",
                                   "age": 50, "gender": "F"}, ticket,
                out_root=state / "records", withheld=False)
    assert record.record_id is not None
    return record.record_id, ticket.monotonic_at_capture


def _run(state: Path, endpoint: str, bucket: str, offset: float, *,
         arm: str | None = None) -> tuple[str | None, bytes, int]:
    """Start the releasing agent; SIGKILL it where armed. (checkpoint killed at, stdout, rc)"""
    cmd = [sys.executable, str(HELD_AGENT), "--state", str(state), "--endpoint", endpoint,
           "--bucket", bucket, "--offset", repr(offset)]
    if arm:
        cmd += ["--arm", arm]
    with (state.parent / f"{state.name}.{'armed' if arm else 'retry'}.err").open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
    killed: str | None = None
    try:
        out, announced = _read_until_announced(proc, RUN_TIMEOUT_S)
        if announced is not None:
            proc.send_signal(signal.SIGKILL)
            killed = announced
        proc.wait(timeout=RUN_TIMEOUT_S)
        assert proc.stdout is not None
        out += proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    return killed, out, proc.returncode


def _objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            objects[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return objects


@pytest.mark.functional
def test_kill_between_naming_and_queuing_then_retry_1ms_later_delivers_once(
        tmp_path: Path, s3_endpoint: str, s3_env: dict[str, str]) -> None:
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    kills: Counter[str] = Counter()
    problems: list[str] = []
    for n, point in enumerate(WINDOW):
        state = tmp_path / f"s{n:02d}"
        bucket = f"held-naming-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=bucket)
        record_id, mono = _hold_one(state, s3_endpoint, bucket)
        offset = NAMED_AT - mono  # the first release names it at x.9995 s
        killed, out, rc = _run(state, s3_endpoint, bucket, offset, arm=point)
        assert killed == point and rc == -signal.SIGKILL, (point, out, rc)
        kills[point] += 1
        # the retry: the clock 1 ms later, so a name chosen afresh is x+1.0005 s
        _, out, rc = _run(state, s3_endpoint, bucket, offset + 0.001)
        assert rc == 0 and b"pending=0" in out, (point, out, rc)

        objects = _objects(s3_endpoint, bucket)
        manifests = {k: json.loads(v) for k, v in objects.items()
                     if k.rsplit("/", 1)[-1].startswith("manifest_")}
        stamps = {k.split("/")[4] for k in objects}
        record_ids = {m["record_id"] for m in manifests.values()}
        expected_stamp = datetime.fromtimestamp(NAMED_AT).astimezone().strftime("%Y%m%d_%H%M%S")
        local = sorted(json.loads(p.read_bytes())["stamp"]
                       for p in (state / "records").glob("*/manifest_*.json"))
        with Outbox(state / "outbox.sqlite3") as box:
            rows = [r for r in box.packages.recent(100) if r.record_id == record_id]
        found = {"manifests": len(manifests), "stamps": sorted(stamps),
                 "record_ids": sorted(record_ids), "objects": len(objects),
                 "local_packages": local, "outbox_rows": len(rows),
                 "held_left": sorted(p.name for p in held_dir(state).iterdir())}
        want = {"manifests": 1, "stamps": [expected_stamp], "record_ids": [record_id],
                "objects": len(file_names(expected_stamp)), "local_packages": [expected_stamp],
                "outbox_rows": 1, "held_left": []}
        if found != want:
            problems.append(f"killed at {point}: {found}")
    print(f"\nheld naming: {sum(kills.values())} kills aimed between naming and queuing: "
          f"{dict(kills)}")
    assert sorted(kills) == sorted(WINDOW) and all(c == 1 for c in kills.values())
    assert not problems, "\n".join(problems)
