"""A capture-and-sync agent process for the crash campaign (run as a subprocess, then killed).

`python tests/campaigns/agent_process.py --state DIR --endpoint URL --bucket B --records N`
syncs once (what a killed run left), then captures records 0..N-1 it has not captured yet
(real PTB-XL recordings standing in for the board, one stamp per index) into
STATE_DIR/records with package_and_decide, syncing after each capture, then drains until
the outbox is empty. It is safe to SIGKILL at any moment and to start again.

`--arm NAME --at K` stops it the K-th time the agent reaches checkpoint NAME (package.*,
capture.queued, drain.*): it prints `checkpoint NAME` on stdout and the thread that got there
waits to be killed, so the campaign's SIGKILL lands exactly there.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from device_agent.core.config import Settings
    from device_agent.core.record import Record
    from device_agent.sync import SyncLoop

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

ECG = REPO / "tests" / "data" / "ecg"
RECORDINGS = ("HR06000", "HR06001", "HR06002", "HR06003", "HR06004", "HR06005")
BASE = datetime(2026, 11, 27, 9, 0, 0).astimezone()
ANNOUNCE = "checkpoint "
NOT_KILLED_AFTER_S = 120.0  # an armed agent nobody kills (its campaign died) ends itself
EXIT_NOT_KILLED = 3


def stamp_of(index: int) -> str:
    """The package stamp of record `index` (its acquisition time names it)."""
    return (BASE + timedelta(seconds=index)).strftime("%Y%m%d_%H%M%S")


class StopAt:
    """The checkpoint callable: at the armed point, say so on stdout and wait to be killed."""

    def __init__(self, name: str | None, at: int = 1) -> None:
        self.name = name
        self.at = at
        self.seen = 0
        self._lock = threading.Lock()

    def __call__(self, name: str) -> None:
        if name != self.name:
            return
        with self._lock:
            self.seen += 1
            if self.seen != self.at:
                return
            sys.stdout.write(f"{ANNOUNCE}{name}\n")
            sys.stdout.flush()
        threading.Event().wait(NOT_KILLED_AFTER_S)
        os._exit(EXIT_NOT_KILLED)


def settings_for(state: Path, endpoint: str, bucket: str, **extra: str) -> Settings:
    from device_agent.core.config import load_settings

    values = {
        "STATE_DIR": str(state), "REPORTS_DIR": str(state / "reports"),
        "USERS_FILE": str(state / "users.json"), "AWS_S3_BUCKET": bucket,
        "AWS_S3_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "S3_CONNECT_TIMEOUT_S": "1", "S3_READ_TIMEOUT_S": "5", "S3_MAX_ATTEMPTS": "1",
        "RETRY_MAX_BACKOFF_S": "1", "SYNC_INTERVAL_S": "0.1", "DEVICE_SERIAL": "SN-CRASH-01",
        "CLOCK_CHECK": "floor",
    }
    values.update(extra)
    return load_settings(env_file=None, environ={}, overrides=values)


def make_record(index: int, serial: str) -> Record:
    """Record `index`: a real recording as the board would deliver it, stamped BASE + index s."""
    from device_agent.core.record import DeviceInfo
    from device_agent.lab import wfdb

    return wfdb.to_record(ECG / f"{RECORDINGS[index % len(RECORDINGS)]}.hea",
                          acquired_at=BASE + timedelta(seconds=index),
                          device=DeviceInfo(serial=serial, model="ECG12-PI"))


def captured_stamps(records: Path) -> set[str]:
    return {p.name.split("_", 1)[1].removesuffix(".json")
            for p in records.glob("*/manifest_*.json")}


def drain_until_empty(loop: SyncLoop, stop: threading.Event, passes: int = 200) -> int:
    """Sync passes until nothing is pending (at most `passes`, 0.1 s apart); what is left."""
    for _ in range(passes):
        pending = loop.run_once(wait=True).pending
        if pending == 0:
            return 0
        stop.wait(0.1)
    return pending


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--pace", type=float, default=0.0,
                        help="seconds a capture takes on the simulated board")
    parser.add_argument("--serve", action="store_true",
                        help="after the captures keep syncing like `run` until stopped")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="extra settings")
    parser.add_argument("--arm", metavar="CHECKPOINT",
                        help="stop at this checkpoint and wait to be killed")
    parser.add_argument("--at", type=int, default=1, metavar="K",
                        help="stop the K-th time the armed checkpoint is reached")
    args = parser.parse_args()
    checkpoint = StopAt(args.arm, args.at)
    logging.basicConfig(level=logging.WARNING, format="agent %(levelname)s %(name)s: %(message)s")

    from device_agent.capture import measure_once, package_and_decide
    from device_agent.core.clock import clock_from_settings
    from device_agent.shipping.drain import Drainer
    from device_agent.shipping.outbox import Outbox
    from device_agent.shipping.uploader import Uploader
    from device_agent.sync import SyncLoop

    extra = dict(item.split("=", 1) for item in args.overrides)
    settings = settings_for(args.state, args.endpoint, args.bucket, **extra)
    records = args.state / "records"
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # SIGTERM ends the --serve loop
        signal.signal(sig, lambda *_: stop.set())
    clock = clock_from_settings(settings)
    with Outbox.open(settings) as outbox:
        drainer = Drainer(outbox, Uploader.from_settings(settings), clock=clock, stop=stop,
                          backoff_base_s=0.2, backoff_cap_s=settings.retry_max_backoff_s,
                          checkpoint=checkpoint)
        loop = SyncLoop(settings, outbox=outbox, drainer=drainer, stop=stop, clock=clock)
        loop.run_once(wait=True)  # what an earlier run left, as the service does at start
        for index in range(args.records):
            if stop.is_set():
                break
            if stamp_of(index) in captured_stamps(records):
                continue
            stop.wait(args.pace)  # the acquisition itself
            record = measure_once(make_record(index, settings.device_serial),
                                  mains_hz=settings.mains_hz)
            package_and_decide(record, {"first_name": "Synthetic", "last_name": f"P{index}",
                                        "age": 50, "gender": "F"}, settings, outbox,
                               out_root=records, withheld=False, checkpoint=checkpoint)
            loop.run_once(wait=True)
            stop.wait(args.pace)
        while args.serve and not stop.is_set():
            loop.run_once(wait=True)
            stop.wait(settings.sync_interval_s)
        if not stop.is_set():
            drain_until_empty(loop, stop)
        left = outbox.stats().pending
        loop.close()
    print(f"done pending={left}", flush=True)
    return 0 if left == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
