"""Network faults: refused connections, 503 SlowDown and mid-upload resets, then recovery.

The agent is a subprocess syncing through a fault-injecting proxy in front of moto. During
the outage it must back off (little CPU time against wall time) without growing its memory;
afterwards everything is delivered, and nothing twice.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest

from device_agent.outbox import Outbox
from tests.conftest import wait_until
from tests.faultproxy import FaultProxy

AGENT = Path(__file__).resolve().parents[1] / "campaigns" / "agent_process.py"
RECORDS = 4
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


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
            cpu0, rss0, wall0 = _cpu_s(agent.pid), _rss_kb(agent.pid), time.monotonic()
            for mode in ("refuse", "slowdown", "reset", "slowdown", "reset"):
                proxy.set_mode(mode)
                time.sleep(1.6)  # the outage itself: a fixed stretch of wall time
            cpu1, rss1, wall1 = _cpu_s(agent.pid), _rss_kb(agent.pid), time.monotonic()
            with Outbox(state / "outbox.sqlite3") as box:
                during = box.stats()
            proxy.set_mode("pass")
            wait_until(lambda: len(_bucket_objects(s3_endpoint, s3_bucket)) >= 4 * RECORDS
                       and Outbox(state / "outbox.sqlite3").stats().pending == 0,
                       timeout=30, interval=0.3, what="delivery after the outage")
            agent.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            agent.wait(timeout=5)
            stop_s = time.monotonic() - stopped
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
            _out, err = agent.communicate()
        counts = dict(proxy.counts)

    objects = _bucket_objects(s3_endpoint, s3_bucket)
    shas = [hashlib.sha256(body).hexdigest() for body in objects.values()]
    with Outbox(state / "outbox.sqlite3") as box:
        items = box.items()
        after = box.stats()
    cpu_share = (cpu1 - cpu0) / (wall1 - wall0)
    numbers = {"outage_s": round(wall1 - wall0, 1), "cpu_s": round(cpu1 - cpu0, 2),
               "cpu_share": round(cpu_share, 3), "rss_growth_kb": rss1 - rss0,
               "attempts": sum(i.attempts for i in items), "objects": len(objects),
               "stop_s": round(stop_s, 2), **counts,
               "outcomes": sorted({i.outcome for i in items})}
    with capsys.disabled():
        print(f"\nnetwork faults: {numbers}")
    assert during.delivered < 4 * RECORDS, "the outage must have blocked delivery"
    assert during.last_error
    assert counts["slowdowns"] and counts["resets"] and counts["refused_periods"]
    assert len(objects) == 4 * RECORDS, sorted((k, len(v)) for k, v in objects.items())
    assert len(set(shas)) == len(shas), "an object was stored twice"
    assert all("__" not in key for key in objects), "a retry was mistaken for a collision"
    assert after.pending == 0 and after.failed == 0
    assert cpu_share < 0.25, f"the agent spun during the outage: {numbers}"
    assert rss1 - rss0 < 8 * 1024, f"the agent's memory grew during the outage: {numbers}"
    assert agent.returncode == 0, err[-2000:]
    assert stop_s < 1.5
