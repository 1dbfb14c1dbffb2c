"""Network faults: refused connections, 503 SlowDown and mid-upload resets, then recovery.

The agent is a subprocess syncing through a fault-injecting proxy in front of moto. Each
fault is held until the agent has met it (the proxy or the outbox says so); afterwards
everything is delivered, and nothing twice. What the outage costs in CPU and memory is
measured in bench/, not asserted here.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest

from device_agent.shipping.outbox import Outbox
from tests.conftest import wait_until
from tests.faultproxy import FaultProxy

AGENT = Path(__file__).resolve().parents[1] / "campaigns" / "agent_process.py"
RECORDS = 4
def _bucket_objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    objects = {}
    for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        objects[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return objects


@pytest.mark.functional
def test_outage_refused_slowdown_reset_then_everything_once(tmp_path, s3_endpoint, s3_bucket,
                                                            capsys):
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with FaultProxy(urlparse(s3_endpoint).port, seed=3) as proxy:
        proxy.set_mode("refuse")
        agent = subprocess.Popen(
            [sys.executable, str(AGENT), "--state", str(state), "--endpoint", proxy.url,
             "--bucket", s3_bucket, "--records", str(RECORDS), "--serve",
             "--set", "SYNC_INTERVAL_S=0.2", "--set", "RETRY_MAX_BACKOFF_S=2",
             "--set", "S3_MAX_ATTEMPTS=2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            wait_until(lambda: len(list(state.glob("records/*/manifest_*.json"))) == RECORDS,
                       timeout=30, what="the captures")
            wait_until(lambda: (state / "outbox.sqlite3").exists(), what="the outbox")
            box = Outbox(state / "outbox.sqlite3")

            def paused_by(code: str) -> bool:
                paused = box.pause.current()
                return paused is not None and code in paused[1]

            proxy.set_mode("refuse")
            wait_until(lambda: paused_by("ConnectionError"), timeout=30,
                       what="the agent to meet the refused connections")
            for mode, counter in (("slowdown", "slowdowns"), ("reset", "resets"),
                                  ("slowdown", "slowdowns"), ("reset", "resets")):
                seen = proxy.counts[counter]
                proxy.set_mode(mode)
                wait_until(lambda c=counter, n=seen: proxy.counts[c] > n, timeout=30,
                           what=f"the agent to meet {mode}")
            during = box.stats()
            proxy.set_mode("pass")
            wait_until(lambda: len(_bucket_objects(s3_endpoint, s3_bucket)) >= 5 * RECORDS
                       and box.stats().pending == 0,
                       timeout=60, interval=0.3, what="delivery after the outage")
            box.close()
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=10)
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
            _out, err = agent.communicate()
        counts = dict(proxy.counts)

    objects = _bucket_objects(s3_endpoint, s3_bucket)
    shas = [hashlib.sha256(body).hexdigest() for body in objects.values()]
    with Outbox(state / "outbox.sqlite3") as box:
        items = box.items.all()
        after = box.stats()
    numbers = {"attempts": sum(i.attempts for i in items), "objects": len(objects), **counts,
               "outcomes": sorted({str(i.outcome) for i in items})}
    with capsys.disabled():
        print(f"\nnetwork faults: {numbers}")
    assert during.delivered < 5 * RECORDS, "the outage must have blocked delivery"
    assert counts["slowdowns"] and counts["resets"] and counts["refused_periods"]
    assert len(objects) == 5 * RECORDS, sorted((k, len(v)) for k, v in objects.items())
    assert len(set(shas)) == len(shas), "an object was stored twice"
    assert all("__" not in key for key in objects), "a retry was mistaken for a collision"
    assert after.pending == 0 and after.failed == 0
    assert agent.returncode == 0, err[-2000:]
