"""Two units stamp a capture in the same second into one bucket: nothing is overwritten,
and each manifest vouches only for its own unit's files (moto's HTTP server)."""

from __future__ import annotations

import hashlib
import json
import random
import threading

import boto3
import pytest

from device_agent.core.clock import Clock
from device_agent.core.config import load_settings
from device_agent.documents.package import load_package
from device_agent.shipping.drain import Drainer
from device_agent.shipping.outbox import Outbox
from device_agent.shipping.uploader import Uploader, make_client
from device_agent.sync import SyncLoop
from tests.helpers import make_package

STAMP = "20260124_121815"


def _unit(tmp_path, name, endpoint, bucket):
    return load_settings(environ={}).replace(
        state_dir=tmp_path / name / "state", reports_dir=tmp_path / name / "reports",
        users_file=tmp_path / name / "users.json", s3_bucket=bucket,
        s3_endpoint_url=endpoint, s3_region="us-east-1", aws_access_key_id="testing",
        aws_secret_access_key="testing", disk_reserve_mb=0, clock_check="floor",
        device_serial=name)


def _deliver(settings, seed):
    pkg = make_package(settings.state_dir / "records", STAMP, seed=seed)
    stop = threading.Event()
    clock = Clock(check="floor")
    with Outbox.open(settings) as outbox:
        outbox.packages.add(load_package(pkg.folder))
        drainer = Drainer(outbox, Uploader.from_settings(settings, make_client(settings)),
                          clock=clock, stop=stop, rng=random.Random(1))
        loop = SyncLoop(settings, outbox=outbox, drainer=drainer, stop=stop, clock=clock)
        try:
            result = loop.run_once()
        finally:
            loop.close()
        assert result.pending == 0 and not result.errors, result.errors
    return pkg


@pytest.mark.functional
def test_same_stamp_from_two_units_keeps_both_and_manifests_tell_the_truth(
        tmp_path, s3_endpoint, s3_bucket):
    first = _deliver(_unit(tmp_path, "UNIT-A", s3_endpoint, s3_bucket), seed=1)
    second = _deliver(_unit(tmp_path, "UNIT-B", s3_endpoint, s3_bucket), seed=2)

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert len(listed) == 8, listed  # four objects each, none overwritten

    def body(key: str) -> bytes:
        return s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()

    manifests = [k for k in listed if k.rsplit("/", 1)[-1].startswith("manifest_")]
    assert len(manifests) == 2
    for key in manifests:
        doc = json.loads(body(key))
        for entry in doc["files"]:
            data = body(entry["key"])
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], (key, entry["key"])
    # and each unit's manifest lists its own files, which differ between the units
    files_of = {json.loads(body(k))["record_id"]: {e["key"] for e in json.loads(body(k))["files"]}
                for k in manifests}
    assert files_of[first.record_id].isdisjoint(files_of[second.record_id])
